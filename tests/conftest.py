"""Shared test configuration. Fixtures live in tests/fixtures/, one module per real component."""

# CPython 3.11.7 can raise "AST constructor recursion depth mismatch" when two threads parse
# source at once (numpy.ma does, lazily); import it up front, before any test starts threads.
import numpy.ma  # noqa: F401

pytest_plugins = [
    "tests.fixtures.ray_cluster",
    "tests.fixtures.mlflow_registry",
    "tests.fixtures.postgres",
    "tests.fixtures.s3",
    "tests.fixtures.kafka",
]
