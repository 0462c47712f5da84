"""The fuzz targets' short mode (tests/fuzz/fuzz_targets.py says what each
feeds and checks): a few hundred inputs per target, derandomized, so the
suite is fast and gives the same inputs on every run. bench/fuzz.py runs the
same targets for a million inputs or N minutes, seeded.

HARNESS_FUZZ_EXAMPLES raises the count (e.g. 5000 before a release)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from fuzz_targets import (
    HttpRequest,
    HttpTarget,
    SessionInput,
    check_loader,
    check_render,
    check_session,
    check_session_bytes,
    http_request,
    loader_input,
    message_bytes,
    session_bytes,
    session_input,
)
from hypothesis import HealthCheck, given, settings

from harness.testing import Harness

settings.register_profile(
    "fuzz-short", derandomize=True, database=None, deadline=None, print_blob=True,
    max_examples=int(os.environ.get("HARNESS_FUZZ_EXAMPLES", "300")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much])
SHORT = settings.get_profile("fuzz-short")


@SHORT
@given(session_input)
def test_fuzz_session_commands_one_reply_each_never_internal(case: SessionInput) -> None:
    check_session(case)


@SHORT
@given(session_bytes)
def test_fuzz_session_random_bytes_never_internal(case: tuple[str, list[bytes]]) -> None:
    check_session_bytes(case)


@SHORT
@given(loader_input)
def test_fuzz_loader_raises_only_positioned_scenario_errors(case: tuple[str, Any, bool]
                                                            ) -> None:
    check_loader(case)


@SHORT
@given(message_bytes)
def test_fuzz_render_never_raises(raw: bytes) -> None:
    check_render(raw)


@pytest.fixture(scope="module")
def http() -> Iterator[HttpTarget]:
    with Harness(http=True) as open_, Harness(http=True, api_token="tok") as guarded:
        assert open_.http_url and guarded.http_url
        yield HttpTarget({False: open_.http_url, True: guarded.http_url})


def test_fuzz_api_never_5xx(http: HttpTarget) -> None:
    @settings(SHORT, max_examples=min(SHORT.max_examples, 200))
    @given(http_request)
    def run(req: HttpRequest) -> None:
        http.check(req)

    run()
