"""Scenarios: the model, the loader (YAML -> model) and the sans-IO engine.

Nothing in this package does I/O beyond reading scenario files in the loader,
and nothing imports asyncio, aiosmtpd, sqlite3 or HTTP libraries (a test
enforces it)."""
