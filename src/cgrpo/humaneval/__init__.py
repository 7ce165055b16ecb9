"""Pairwise A/B human evaluation: pairs from two evaluation runs, a web app, a SQLite store, results.

Modules: ``pairs`` (eval dirs -> pairs.jsonl), ``store`` (SQLite schema, migrations, votes), ``app``
(FastAPI pages and API), ``stats`` (shares, bootstrap, agreement), ``export`` (results format),
``cli`` (``cgrpo humaneval ...``), ``testing`` (fake eval runs, a server subprocess). ``stats`` needs
only numpy; the rest needs the ``humaneval`` extra (fastapi, uvicorn, jinja2; pydantic comes with fastapi).
"""
