"""Fixtures for the lab tests: a real Postfix relaying to a real harness.

    def test_x(lab_harness, postfix_lab):
        h = lab_harness("mailbox-full")        # a started Harness
        pf = postfix_lab(h, settings={...})    # a started PostfixLab relaying to it

Both are factories, so a test can start several of each (two Postfix
instances, or a second harness port as a transport). Teardown stops every
Postfix first (then the harnesses), fails the test if any process of an
instance survived, and attaches each instance's maillog to the report of a
failed test. Without Postfix, or without root, the tests are skipped.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.lab.exim import EximLab
from harness.lab.postfix import PostfixLab
from harness.scenario.model import Scenario
from harness.testing import Harness


@pytest.fixture
def lab_harness() -> Iterator[Callable[..., Harness]]:
    """Factory: `lab_harness(scenario=None, **Harness kwargs)` -> a started Harness."""
    started: list[Harness] = []

    def make(scenario: str | Path | Scenario | None = None, **kw: Any) -> Harness:
        h = Harness(scenario, **kw).start()
        started.append(h)
        return h

    yield make
    for h in reversed(started):
        h.stop()


@pytest.fixture
def postfix_lab(request: pytest.FixtureRequest, lab_harness: Callable[..., Harness]
                ) -> Iterator[Callable[..., PostfixLab]]:
    """Factory: `postfix_lab(harness, **PostfixLab kwargs)` -> a started PostfixLab
    whose relayhost is that harness. Depends on `lab_harness` so that the
    labs stop before the harnesses they relay to."""
    reason = PostfixLab.unavailable()
    if reason:
        pytest.skip(reason)
    labs: list[PostfixLab] = []

    def make(harness: Harness | tuple[str, int], **kw: Any) -> PostfixLab:
        relay = (harness.host, harness.port) if isinstance(harness, Harness) else harness
        lab = PostfixLab(relay, **kw)
        labs.append(lab)  # registered before start(): a failed start is cleaned up too
        return lab.start()

    yield make
    problems: list[str] = []
    for lab in reversed(labs):
        try:
            lab.stop()
        except Exception as e:  # keep stopping the others; report below
            problems.append(f"{lab.syslog_name}: stop failed: {e}")
        left = lab.processes()
        if left:
            problems.append(f"{lab.syslog_name}: processes left behind: {left}")
        if lab.temporary and not lab.keep and lab.root.exists():
            problems.append(f"{lab.syslog_name}: {lab.root} not removed")
        request.node.add_report_section("teardown", f"maillog {lab.syslog_name}", lab.maillog())
    if problems:
        pytest.fail("\n".join(problems))


@pytest.fixture
def exim_lab(request: pytest.FixtureRequest, lab_harness: Callable[..., Harness]
             ) -> Iterator[Callable[..., EximLab]]:
    """Factory: `exim_lab(harness, **EximLab kwargs)` -> a started EximLab that
    sends every message to that harness. Depends on `lab_harness` so that the
    labs stop before the harnesses they relay to.

    Without root the tests are skipped; as root, a missing Exim fails them
    with the reason and the command that installs it (tools/install-exim.sh):
    a lab test that silently skips would look like a pass."""
    if os.geteuid() != 0:
        pytest.skip("a private Exim instance needs root")
    reason = EximLab.unavailable()
    if reason:
        pytest.fail(reason, pytrace=False)
    labs: list[EximLab] = []

    def make(harness: Harness | tuple[str, int], **kw: Any) -> EximLab:
        relay = (harness.host, harness.port) if isinstance(harness, Harness) else harness
        lab = EximLab(relay, **kw)
        labs.append(lab)  # registered before start(): a failed start is cleaned up too
        return lab.start()

    yield make
    problems: list[str] = []
    for lab in reversed(labs):
        try:
            lab.stop()
        except Exception as e:  # keep stopping the others; report below
            problems.append(f"{lab.name}: stop failed: {e}")
        left = lab.processes()
        if left:
            problems.append(f"{lab.name}: processes left behind: {left}")
        if lab.temporary and not lab.keep and lab.root.exists():
            problems.append(f"{lab.name}: {lab.root} not removed")
        request.node.add_report_section("teardown", f"mainlog {lab.name}", lab.maillog())
    if problems:
        pytest.fail("\n".join(problems))
