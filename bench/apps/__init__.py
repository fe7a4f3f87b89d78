"""The apps the benchmarks serve under gunicorn (deploy/gunicorn.conf.py)."""
