"""Analysis of what was captured: pure functions over bytes.

`dsn` (NDR parsing), `codes` (the status code catalogue), `dns` (the
injectable resolver: scripted zones from a scenario, or the system's DNS on
request), `auth` (DKIM, SPF, DMARC and the Authentication-Results header)
and `evidence` (the sending side's logs read, and lined up with what the
harness recorded).

Nothing here does I/O at import time, and nothing imports asyncio, aiosmtpd,
sqlite3, socket-using or HTTP libraries at module level (a test enforces it).
dkimpy, pyspf and dnspython load socket, so they are imported inside the
functions that use them; those functions are synchronous, and callers on an
event loop run them in a thread."""
