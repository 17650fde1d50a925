"""Gemini market data and trading on Apache Kafka: the shared library."""

__version__ = "0.1.0"
