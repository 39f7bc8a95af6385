"""Shared test configuration. Fixtures live in tests/fixtures/, one module per real component."""

pytest_plugins = [
    "tests.fixtures.ray_cluster",
    "tests.fixtures.mlflow_registry",
    "tests.fixtures.postgres",
    "tests.fixtures.s3",
    "tests.fixtures.kafka",
]
