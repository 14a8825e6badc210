"""Shared fixtures: real servers on free loopback ports, never mocks."""

pytest_plugins = [
    "tests.fixtures.redis_server",
    "tests.fixtures.kafka_broker",
    "tests.fixtures.system",
]
