"""Real MTAs run privately on loopback, pointed at the harness (the "lab").

`PostfixLab` runs a throw-away Postfix instance whose relayhost is a running
harness, so tests and users can watch what a real sending MTA does with the
replies a scenario gives: retries, deferrals, NDRs (DSNs)."""

from harness.lab.postfix import PostfixLab, PostfixLabError

__all__ = ["PostfixLab", "PostfixLabError"]
