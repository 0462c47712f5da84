"""Queues over time (harness/analysis/queue_series.py), `harness predict
--rate` and `harness queues`: the build-up a steady flow makes against a dead
remote and against greylisting, and Get-Queue exports read as a series."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from rich.console import Console

from harness import cli
from harness.analysis import retry
from harness.analysis.queue_series import (
    QueueSample,
    build_up,
    parse_rate,
    read_get_queue,
    sample,
    stay,
    summary,
    threshold,
)
from harness.predict import PredictError, predict_command
from harness.queues import QueuesError, queues_command, read_files

FIXTURES = Path(__file__).parent / "fixtures" / "get-queue"
T0900 = 1796288400.0  # 2026-12-03T09:00:00Z


def test_sample_counts_depth_deferred_and_the_oldest() -> None:
    s = sample(100.0, [(40.0, True), (90.0, False), (99.5, True)])
    assert s == QueueSample(t=100.0, depth=3, oldest_age=60.0, deferred=2)
    assert sample(5.0, []) == QueueSample(t=5.0, depth=0, oldest_age=0.0, deferred=0)


def test_summary_gives_the_peaks() -> None:
    series = [QueueSample(t=0, depth=1, oldest_age=0, deferred=0),
              QueueSample(t=1, depth=4, oldest_age=30, deferred=3),
              QueueSample(t=2, depth=2, oldest_age=61, deferred=2)]
    assert summary(series) == {"samples": 3, "peak_depth": 4, "peak_oldest_age": 61,
                               "peak_deferred": 3}


@pytest.mark.parametrize(("text", "per_second"), [
    ("100/min", 100 / 60), ("5/s", 5.0), ("2000/h", 2000 / 3600), ("1 / day", 1 / 86400),
    ("0.5/minute", 0.5 / 60)])
def test_parse_rate(text: str, per_second: float) -> None:
    assert parse_rate(text) == pytest.approx(per_second)


@pytest.mark.parametrize("text", ["100", "100/week", "fast", "0/min", "-1/min"])
def test_parse_rate_refuses_what_it_cannot_read(text: str) -> None:
    with pytest.raises(ValueError, match="rate"):
        parse_rate(text)


def test_build_up_counts_arrivals_still_queued() -> None:
    # one a second, each held 10 s: arrivals 0..t while t < 10, then the last 10
    got = build_up(1.0, 10.0, [0, 5, 9.5, 10, 25])
    assert [(s.depth, s.oldest_age) for s in got] == [
        (1, 0.0), (6, 5.0), (10, 9.5), (10, 9.0), (10, 9.0)]
    assert all(s.deferred == s.depth for s in got)
    # held for ever (a dead remote with no expiry): everything stays
    assert [s.depth for s in build_up(2.0, None, [0, 10, 100])] == [1, 21, 201]
    with pytest.raises(ValueError):
        build_up(1.0, 10.0, [-1])


def test_stay_greylisting_leaves_at_the_first_retry_after_the_window() -> None:
    exchange = retry.predict("exchange")  # retries every 15 min for 2 days
    assert stay(exchange.attempts, exchange.expires_at, 300) == 900
    assert stay(exchange.attempts, exchange.expires_at, None) == 2 * 86400  # dead: expiry
    postfix = retry.predict("postfix")
    grey = stay(postfix.attempts, postfix.expires_at, 300)
    assert grey is not None and 300 <= grey < 900
    # a window longer than the message lives: it expires instead
    assert stay([0, 60, 120], 150.0, 600) == 150.0


def test_threshold_separates_greylisting_from_a_dead_remote() -> None:
    assert threshold(900, 86400) == 1125
    assert threshold(None, 86400) is None
    assert threshold(900, 1000) is None  # expiry comes before any useful alert


def test_predict_rate_exchange_online_dead_remote_plateaus_at_24_hours() -> None:
    con = Console(file=io.StringIO(), width=160, color_system=None)
    assert predict_command(None, con, mta="exchange-online", rate="100/min", json=True) == 0
    assert isinstance(con.file, io.StringIO)
    q = json.loads(con.file.getvalue())["queue"]
    dead, grey = q["scenarios"]
    assert (dead["name"], dead["held"]) == ("dead remote", 86400)
    assert (grey["name"], grey["held"]) == ("greylisting", 900)  # 5 min window, 15 min retry
    last = dead["samples"][-1]
    assert (last["t"], last["depth"]) == (86400, 144000)  # 100/min x 24 h, then bounced
    assert max(s["depth"] for s in grey["samples"]) == 1500  # 15 min of arrivals
    assert max(s["oldest_age"] for s in grey["samples"]) <= 900
    assert q["alert_oldest_age"] == 1125 and q["alert_depth"] == 1875


def test_predict_rate_text_shows_both_and_the_alert() -> None:
    con = Console(file=io.StringIO(), width=160, color_system=None)
    assert predict_command(None, con, mta="exchange", rate="100/min", greylist="5m") == 0
    assert isinstance(con.file, io.StringIO)
    text = con.file.getvalue()
    assert "queue build-up at 100 messages a minute" in text
    assert "dead remote" in text and "greylisting (5m)" in text
    assert "288,000" in text  # 100/min for the on-premises two days
    assert "alert when the oldest queued message is older than 18m45s" in text


@pytest.mark.parametrize(("options", "problem"), [
    ({"rate": "lots"}, "rate 'lots'"), ({"rate": "5/min", "greylist": "soon"}, "soon")])
def test_predict_rate_bad_options_are_one_line_errors(options: dict[str, str],
                                                      problem: str) -> None:
    with pytest.raises(PredictError, match=problem):
        predict_command(None, Console(file=io.StringIO()), **options)


def test_get_queue_csv_series_from_one_export() -> None:
    got = read_get_queue((FIXTURES / "retry-series.csv").read_text(encoding="utf-8-sig"),
                         path="retry-series.csv")
    assert got.problems == ()
    # 09:00: 2 for the mailbox + 40 in Retry (the shadow queue is not waiting mail);
    # retrying since 08:55. 09:05: 90. 09:20: the remote took them, 3 left, none deferred.
    assert [(s.t - T0900, s.depth, s.deferred, s.oldest_age) for s in got.samples] == [
        (0, 42, 40, 300), (300, 90, 90, 600), (1200, 3, 0, 0)]


def test_get_queue_json_from_windows_powershell() -> None:
    got = read_get_queue((FIXTURES / "sample-0910.json").read_text(), path="s.json")
    assert got.problems == ()
    assert [(s.t - T0900, s.depth, s.deferred, s.oldest_age) for s in got.samples] == [
        (600, 150, 150, 900)]


def test_get_queue_bad_rows_are_reported_by_line_and_the_rest_read() -> None:
    got = read_get_queue((FIXTURES / "broken.csv").read_text(), path="broken.csv")
    assert got.problems == (
        "broken.csv:2: MessageCount 'many' is not a number; skipped",
        "broken.csv:3: SampledAt is empty; skipped")
    assert [(s.depth, s.deferred) for s in got.samples] == [(6, 0)]
    # the file's own time is for a file without the column: a row whose
    # SampledAt is empty or unreadable is not quietly dated by it
    text = (FIXTURES / "broken.csv").read_text().replace('"4",""', '"4","soon"')
    text += '"EX01\\10","DnsConnectorDelivery","Ready","5",""\n'
    got = read_get_queue(text, path="b.csv", file_time=T0900)
    assert got.problems[1:] == ("b.csv:3: SampledAt 'soon' is not a time; skipped",
                                "b.csv:5: SampledAt is empty; skipped")
    assert [(s.depth, s.deferred) for s in got.samples] == [(6, 0)]
    no_column = read_get_queue('"Identity","Status","MessageCount"\n"EX\\7","Ready","3"\n',
                               path="n.csv")
    assert no_column.problems == (
        "n.csv:2: no sample time (add a SampledAt column, see docs/exchange-lab.md); skipped",)
    assert read_get_queue("", path="e.csv").problems == ("e.csv: empty file, no queue in it",)
    assert read_get_queue("[{", path="j.json").problems[0].startswith("j.json:1:")


def test_get_queue_without_sampled_at_takes_the_file_time(tmp_path: Path) -> None:
    f = tmp_path / "q.csv"
    f.write_text('"Identity","Status","MessageCount"\n"EX\\7","Retry","12"\n')
    os.utime(f, (T0900, T0900))
    samples, problems = read_files([f, tmp_path / "missing.csv"])
    assert [(s.t, s.depth, s.deferred) for s in samples] == [(T0900, 12, 12)]
    assert problems == [f"{tmp_path / 'missing.csv'}: cannot read: No such file or directory"]


def test_queues_command_adds_up_servers_and_orders_by_time(tmp_path: Path) -> None:
    utf16 = tmp_path / "ex02.csv"  # Windows PowerShell's Out-File default
    utf16.write_text('"Identity","Status","MessageCount","SampledAt"\n'
                     '"EX02\\4","Retry","8","2026-12-03T09:05:00Z"\n', encoding="utf-16")
    out, err = io.StringIO(), io.StringIO()
    rc = queues_command([FIXTURES / "retry-series.csv", utf16], as_json=True,
                        out=Console(file=out), err=Console(file=err))
    assert rc == 0 and err.getvalue() == ""
    data = json.loads(out.getvalue())
    assert [(s["time"], s["depth"]) for s in data["samples"]] == [
        ("2026-12-03 09:00:00", 42), ("2026-12-03 09:05:00", 98), ("2026-12-03 09:20:00", 3)]
    assert data["summary"]["peak_depth"] == 98
    with pytest.raises(QueuesError, match="no Get-Queue sample"):
        queues_command([FIXTURES / "README.md"], as_json=False, out=Console(file=io.StringIO()),
                       err=Console(file=io.StringIO()))


def test_queues_cli_prints_the_series(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["queues", str(FIXTURES / "retry-series.csv"),
                     str(FIXTURES / "sample-0910.json")]) == 0
    text = capsys.readouterr().out
    assert "2026-12-03 09:10:00" in text and "peak depth 150" in text
    assert cli.main(["queues", str(FIXTURES / "README.md")]) == 1
