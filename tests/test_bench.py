"""The benchmark harness still runs (a smoke run: its figures are not judged here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_benchmarks_run_and_write_their_figures(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--only", "ingest,latency,fanout",
         "--duration", "1", "--rate", "200", "--tasks", "5000", "--results", str(tmp_path)],
        capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    [written] = tmp_path.glob("*.json")
    figures = json.loads(written.read_text())["figures"]
    assert figures["ingest"]["receiver_rps"] > 0 and figures["ingest"]["baseline_rps"] > 0
    assert figures["ingest"]["callbacks_stored"] >= figures["ingest"]["callbacks_acknowledged_measured"]
    cpu = figures["ingest"]["cpu_us_per_request"]  # each process of the receiver is found and measured
    assert cpu["baseline"] > 0 and cpu["receiver_loop"] > 0 and cpu["receiver_writer"] > 0
    assert figures["latency"]["missing"] == 0
    assert figures["fanout"]["deliveries_received"] == figures["fanout"]["deliveries_expected"]
    assert "ingest: bare Starlette endpoint" in done.stdout


def test_a_run_is_compared_with_the_latest_earlier_run_that_has_each_figure(tmp_path: Path) -> None:
    from bench.run import compare_with_earlier

    def write(stamp: str, figures: dict[str, Any]) -> None:
        (tmp_path / f"{stamp}.json").write_text(json.dumps({"date": stamp, "figures": figures}))

    first = {"ingest": {"ratio": 0.2, "receiver_p99_ms": 20.0}, "fanout": {"deliveries_per_second": 4000.0}}
    write("2026-12-01T10-00-00", first)
    write("2026-12-02T10-00-00", {"ingest": {"ratio": 0.25}})  # an ingest-only run: no fan-out figure
    write("2026-12-03T10-00-00-quick", {"ingest": {"ratio": 0.9}})  # smoke runs are not compared with full ones
    (tmp_path / "2026-12-04T10-00-00.json").write_text("not json")  # skipped, as are files not shaped as results
    (tmp_path / "2026-12-05T10-00-00.json").write_text("[1, 2]")
    write("2026-12-06T10-00-00", {"ingest": {"ratio": "n/a", "receiver_p99_ms": True}, "fanout": []})

    now = {
        "ingest": {"ratio": 0.3, "receiver_p99_ms": 25.0},
        "fanout": {"deliveries_per_second": 4000},
        "soak": {"growth": 0.01},  # in no earlier run: not compared
    }
    lines = compare_with_earlier(now, tmp_path, quick=False)

    assert lines == [
        "ingest: receiver / bare endpoint: 0.25 (2026-12-02T10-00-00) → 0.3, +20.0 % (better)",
        "ingest: receiver p99 ms: 20 (2026-12-01T10-00-00) → 25, +25.0 % (worse)",
        "fan-out deliveries/s: 4,000 (2026-12-01T10-00-00) → 4,000, same",
    ]
    assert compare_with_earlier(now, tmp_path, quick=True)[0].startswith("ingest: receiver / bare endpoint: 0.9 (")
    assert compare_with_earlier(now, tmp_path / "none", quick=False) == []
