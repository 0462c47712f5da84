"""`harness probe`: Exchange's SMTPDiag done the modern way. The client that
dials out (client.py) and the command around it (command.py); the checks and
the verdicts are pure, in harness/analysis (mx, certificate, probe_verdict)."""
