"""The benchmark harness still runs (a smoke run: its figures are not judged here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
