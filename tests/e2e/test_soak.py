"""A reduced soak (benchmarks/soak.py): a served tiny engine under mixed load with client
disconnects, aborts and 400s, then checked for lost requests, leftover pruning state, memory
growth and a probe prompt's greedy tokens (the full run: docs/benchmarks.md)."""

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_reduced_soak_passes_every_check(tmp_path):
    out = tmp_path / "soak.json"
    cmd = [sys.executable, str(BENCHMARKS / "soak.py"), "--requests", "300", "--concurrency",
           "8", "--json", str(out), "--log", str(tmp_path / "server.log")]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=BENCHMARKS)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["failures"] == [] and report["probe_same"] and report["pruned_requests"] > 0
    outcomes = report["outcomes"]
    for kind in ("long", "long_p", "long_off", "short"):
        assert outcomes[f"{kind}:completed"] > 0
    assert outcomes["bad:rejected"] > 0 and outcomes["disconnect:disconnected"] > 0
    assert outcomes.get("abort:aborted", 0) + outcomes.get("abort:completed", 0) > 0
    assert sum(outcomes.values()) == report["requests"] == 300
    assert Path(report["log"]).exists()
