"""HTTP control API and live web page (aiohttp, same event loop as SMTP)."""
