"""Pairwise A/B human evaluation: pairs from two evaluation runs, a web app, a SQLite store, results.

Modules: ``pairs`` (eval dirs -> pairs.jsonl), ``images`` (checks and re-encodes a study's images),
``store`` (SQLite schema, migrations, votes, images), ``app`` (FastAPI pages and API), ``stats`` (shares,
bootstrap, agreement), ``export`` (results format), ``cli`` (``cgrpo humaneval ...``); fake eval runs and a
server subprocess for tests are in :mod:`cgrpo.testing.humaneval`. ``stats`` needs
only numpy; the rest needs the ``humaneval`` extra (fastapi, uvicorn, jinja2; pydantic comes with fastapi).
"""
