"""The shared floor under the runner framework and the forge.

HTTP body rules and ErrorEnvelope handlers for Flask, the gunicorn worker class and its
settings check, settings machinery, SQLite and file-lock helpers, process identity, request
signing, structured logs and metrics plumbing. Modules here import only
:mod:`runnerkit.contracts`, :mod:`runnerkit.errors` and each other, never the runner framework,
the forge or the tools above them.
"""
