"""The consumer-group contract and runner, and the in-memory harness for tests."""
