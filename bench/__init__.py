"""Benchmarks of runnerkit and its forge: ``make bench`` (or ``python -m bench``).

Never part of ``make test``: nothing here is named ``test_*`` and it lives outside tests/.
See bench/README.md for what is measured and how.
"""
