"""pytest plugin (entry point `pytest11`): SMTP Harness fixtures.

    @pytest.mark.scenario("greylisting")
    def test_my_app_retries(smtp_harness):
        send_with_my_app(host=smtp_harness.host, port=smtp_harness.port)
        smtp_harness.wait_for_attempts(2, rcpt="user@lab.test")

`smtp_harness`: one server per test session underneath (fast), reset for
each test to the scenario its `scenario` marker names (default: accept).
`harness_factory`: more servers for one test (an MX pair), stopped after it.
Options: --harness-seed N (seeds every harness), --harness-keep-store (keep
the SQLite stores and print where). Safe under pytest-xdist: each worker
process has its own servers on its own ephemeral ports and stores.

On a failing test that used a harness, the report gets a section with the
transcripts and near misses. Errors raised inside a server are re-raised at
the test's teardown."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.scenario.model import Scenario
from harness.testing import Harness

_REPORTS = pytest.StashKey[list[Harness]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("smtp-harness")
    group.addoption("--harness-seed", type=int, default=None,
                    help="seed the harness RNG (chance:, random delays) to replay a run")
    group.addoption("--harness-keep-store", action="store_true", default=False,
                    help="keep the harness SQLite stores after the run and print where")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "scenario(name_or_path): the SMTP Harness scenario for smtp_harness")


def _scenario_of(request: pytest.FixtureRequest) -> str | Path | Scenario | None:
    marker = request.node.get_closest_marker("scenario")
    if marker is None:
        return None
    if len(marker.args) != 1:
        raise pytest.UsageError("@pytest.mark.scenario takes one name or path")
    spec: str | Path | Scenario = marker.args[0]
    if isinstance(spec, str) and spec.endswith((".yaml", ".yml")) and not Path(spec).is_absolute():
        # relative to the test file, like fixtures files usually are
        candidate = Path(str(request.node.fspath)).parent / spec
        if candidate.exists():
            return candidate
    return spec


@pytest.fixture(scope="session")
def _smtp_harness_server(pytestconfig: pytest.Config) -> Iterator[Harness]:
    h = Harness(seed=pytestconfig.getoption("harness_seed"),
                keep_store=pytestconfig.getoption("harness_keep_store"))
    h.start()
    yield h
    h.stop(check=False)
    if h.keep_store:
        print(f"\nsmtp_harness store kept: {h.store_path}")


@pytest.fixture
def smtp_harness(_smtp_harness_server: Harness, request: pytest.FixtureRequest
                 ) -> Iterator[Harness]:
    """A running harness, clean for this test, with the marker's scenario."""
    h = _smtp_harness_server
    h.reset(scenario=_scenario_of(request) or "accept")
    request.node.stash.setdefault(_REPORTS, []).append(h)
    yield h
    h.disconnect_all()  # a connection the test left open (a client's pool) ends here
    h.wait_idle()
    h.check()  # re-raise what went wrong inside the server during this test


@pytest.fixture
def harness_factory(pytestconfig: pytest.Config, request: pytest.FixtureRequest
                    ) -> Iterator[Callable[..., Harness]]:
    """Start more harnesses: `harness_factory("service-unavailable", host="127.0.0.2")`."""
    started: list[Harness] = []

    def make(scenario: str | Path | Scenario | None = None, **kw: Any) -> Harness:
        kw.setdefault("seed", pytestconfig.getoption("harness_seed"))
        kw.setdefault("keep_store", pytestconfig.getoption("harness_keep_store"))
        h = Harness(scenario, **kw).start()
        started.append(h)
        request.node.stash.setdefault(_REPORTS, []).append(h)
        return h

    yield make
    errors: list[BaseException] = []
    for h in reversed(started):
        try:
            h.stop()
        except Exception as e:
            errors.append(e)
    if errors:
        raise errors[0]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Iterator[None]:
    report: pytest.TestReport = yield  # type: ignore[assignment]
    if report.failed and call.when == "call":
        harnesses: list[Harness] = item.stash.get(_REPORTS, [])
        for i, h in enumerate(harnesses):
            try:
                text = h.report()
            except Exception as e:  # the report must never hide the failure
                text = f"(no report: {e})"
            report.sections.append((f"smtp harness {i + 1}: {h.host}:{h.port}", text))
    return report  # type: ignore[return-value]
