"""The benchmarks' short modes: each script runs end to end against real
servers and checks what it counts (messages received, rules decided,
connections greeted). No timing is asserted here: figures are for bench/
runs, read in the closing notes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def bench(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.mark.slow
def test_bench_throughput_quick_counts_every_message(tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    done = bench("throughput.py", "--quick", "--workload", "1k-20-many", "--json", str(out))
    assert "| 1 KB, 20 sessions, many per connection |" in done.stdout
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert {r["sink"] for r in runs} == {"smtp-sink", "bare", "harness"}
    # every sink said (or stored) exactly what smtp-source sent
    assert all(r["checks"] == [f"received {r['messages'] + 20}"] for r in runs), runs
    harness = next(r for r in runs if r["sink"] == "harness")
    assert harness["analysis_us_per_msg"] is not None  # every message was analysed
    # one round: its ratio is the table's
    bare = next(r for r in runs if r["sink"] == "bare")
    entry = result["summary"]["1k-20-many"]
    assert entry["ratios"] == [round(harness["msgs_per_s"] / bare["msgs_per_s"], 2)]
    assert f"| {entry['ratio']:.2f} | {entry['ratios'][0]:.2f} |" in done.stdout


def test_bench_rules_quick_decides_as_expected(tmp_path: Path) -> None:
    done = bench("rules.py", "--quick")
    assert "| exact |" in done.stdout and "| regex |" in done.stdout


@pytest.mark.slow
def test_bench_idle_holds_connections_and_delivers(tmp_path: Path) -> None:
    out = tmp_path / "idle.json"
    bench("idle.py", "--connections", "300", "--json", str(out))
    result = json.loads(out.read_text())
    assert result["connections"] == 300 and result["rss_after_kib"] > 0


@pytest.mark.slow
def test_bench_soak_short_samples_and_draws(tmp_path: Path) -> None:
    out, png = tmp_path / "soak.json", tmp_path / "soak.png"
    bench("soak.py", "--seconds", "4", "--size", "2048", "--sessions", "4",
          "--json", str(out), "--png", str(png))
    result = json.loads(out.read_text())
    assert result["messages"] > 0 and result["drained_after_s"] is not None
    assert result["rss_peak_mb"] > 0 and result["worker_rss_peak_mb"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_fuzz_quick_runs_every_target_and_finds_nothing(tmp_path: Path) -> None:
    out = tmp_path / "fuzz.json"
    done = bench("fuzz.py", "--quick", "--quiet", "--json", str(out))
    assert "| session | 1 | 200 |" in done.stdout
    result = json.loads(out.read_text())
    assert {r["target"] for r in result} == {"session", "session-bytes", "loader", "api",
                                             "render"}
    assert all(r["inputs"] == 200 and r["findings"] == [] for r in result), result


@pytest.mark.slow
def test_bench_store_quick_stores_every_message_on_both_backends(tmp_path: Path) -> None:
    out = tmp_path / "store.json"
    bench("store.py", "--quick", "--workload", "1k-20-many", "--json", str(out))
    result = json.loads(out.read_text())
    assert {r["backend"] for r in result["runs"]} == {"sqlite", "postgresql"}
    assert all(r["messages"] == 300 and r["msgs_per_s"] > 0 for r in result["runs"])


@pytest.mark.slow
def test_bench_workers_quick_measures_the_stateful_decision(tmp_path: Path) -> None:
    out = tmp_path / "workers.json"
    configs = [x for c in ("w1-sqlite", "w2-sqlite", "w1-pg", "w2-pg") for x in ("--config", c)]
    done = bench("workers.py", "--quick", "--workload", "1k-20-many", "--workload", "stateful",
                 *configs, "--json", str(out))
    assert "shared state, CPU per stateful decision" in done.stdout
    result = json.loads(out.read_text())
    # the bench itself checks each store holds every message smtp-source sent
    assert {r["config"] for r in result["runs"]} == {"w1-sqlite", "w2-sqlite", "w1-pg",
                                                     "w2-pg"}


def test_bench_stall_quick_times_the_other_client_and_gets_the_verdicts(
        tmp_path: Path) -> None:
    out = tmp_path / "s.json"
    done = bench("stall.py", "--quick", "--json", str(out))
    assert "| content | 554 |" in done.stdout and "| accept | 250 |" in done.stdout
    results = {r["scenario"]: r for r in json.loads(out.read_text())["results"]}
    # the rule read the large message (in its thread) and refused it; the
    # other client was answered all along
    assert results["content"]["verdicts"] == [554] and results["accept"]["verdicts"] == [250]
    assert results["dmarc"]["verdicts"] == [550]  # unsigned, SPF fails: DMARC fails
    assert results["dkim"]["verdicts"] == [550]  # signed, verified: the rule's 550
    assert all(r["noops"] > 0 for r in results.values())
