"""Real MTAs run privately on loopback, pointed at the harness (the "lab").

`PostfixLab` and `EximLab` run a throw-away Postfix or Exim instance whose
relay is a running harness, so tests and users can watch what a real
sending MTA does with the replies a scenario gives: retries, deferrals,
NDRs (DSNs). Both implement `LabMta` (harness.lab.base): submit, queue
(typed `QueueEntry`), waits, stop, and where the MTA logs."""

from harness.lab.base import LabMta, LabMtaError, QueueEntry
from harness.lab.exim import EximLab, EximLabError
from harness.lab.postfix import PostfixLab, PostfixLabError

__all__ = ["EximLab", "EximLabError", "LabMta", "LabMtaError", "PostfixLab",
           "PostfixLabError", "QueueEntry"]
