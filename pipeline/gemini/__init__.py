"""Gemini's formats: market-data frames, captures of them, and (later) REST signing."""
