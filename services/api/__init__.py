"""The device HTTP API (FastAPI): Visant commands and captures, Lifelog pairing and ingest."""
