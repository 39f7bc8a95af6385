"""Shared test configuration. Fixtures live in tests/fixtures/, one module per real component."""

# CPython 3.11.7 can raise "AST constructor recursion depth mismatch" when two threads parse
# source at once (numpy.ma does, lazily); import it up front, before any test starts threads.
import os

import numpy.ma  # noqa: F401
import pytest

# Replicas and writers generate missing keys only in development mode; the suite runs in it
# (before any Ray process starts, so every worker inherits it). Tests of the strict default set
# SERVE_JOURNAL_DEV_MODE=0 themselves.
os.environ.setdefault("SERVE_JOURNAL_DEV_MODE", "1")

pytest_plugins = [
    "tests.fixtures.ray_cluster",
    "tests.fixtures.mlflow_registry",
    "tests.fixtures.model_versions",
    "tests.fixtures.postgres",
    "tests.fixtures.s3",
    "tests.fixtures.kafka",
]

# The fast tier (`pytest -m "not slow"`, the inner loop) leaves out every test that needs the
# Ray cluster (it takes tens of seconds to start on two cores) and the tests marked slow by hand
# (long soak, kill and benchmark runs).
RAY_FIXTURES = frozenset({"ray_cluster", "serve_instance"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if RAY_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
