"""Opening the forge's store from its settings: PostgreSQL when a URL names it, else SQLite.

Apart from both backends (and above them) so that neither imports the other: the SQLite
store is the default, and psycopg's pool is only imported when the settings ask for
PostgreSQL.
"""

from __future__ import annotations

from typing import Any

from .interface import Database
from .sqlite import ForgeDB


def open_database(settings: Any) -> Database:
    """The forge's store: PostgreSQL when ``DB_URL`` names it, else the SQLite ``DB_PATH``."""
    url = str(settings.db_url).strip()
    if url:
        from .postgres import PostgresDB

        return PostgresDB(url, pool_size=int(settings.db_pool_size))
    return ForgeDB(str(settings.db_path))
