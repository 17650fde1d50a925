"""A local Gemini-compatible venue: market data over WebSockets and the private REST API.

Offline runs and tests talk to it over real sockets exactly as they would to Gemini.
"""
