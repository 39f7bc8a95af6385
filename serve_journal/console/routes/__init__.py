"""The console's pages, one module per concern, each an ``APIRouter`` named ``router``.

- ``session.py``: sign-in, sign-out, health check;
- ``investigate.py``: home, search, one entry with its verify status, a subject's timeline;
- ``models.py``: per-model charts and the stats page;
- ``reports.py``: the latest verify/replay summaries, "run verify now";
- ``admin.py``: forget a subject, the access log, the lifecycle dry run.

:func:`serve_journal.console.app.create_app` includes them all.
"""
