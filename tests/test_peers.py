"""The peer comparison's harness (benchmarks/peers.py), exactness part, for the launcher and the reference only:
the same samples (padded text, and prompt-masked samples), weights and optimizer through the launcher's real
multi-process run and through a one-process big-batch loop must agree to float noise at every accumulation count,
so the benchmark itself cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, cpu_env

pytest.importorskip("transformers", reason="the comparison uses a Hugging Face model: scripts/setup hf,dev")


def test_launcher_matches_the_exact_reference_in_the_peer_benchmark(tmp_path: Path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "peers.py"),
            "--only",
            "launcher",
            "--accumulation",
            "1",
            "4",
            "--global-batch",
            "16",
            "--steps",
            "3",
            "--no-speed",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "peers.json").read_text())
    assert set(results["exactness"]) == {"padded", "prompt-masked"}
    for kind, table in results["exactness"].items():
        for accumulation in ("1", "4"):
            row = table["launcher"][accumulation]
            assert row["steps"] == 3, row
            assert row["max_loss_diff"] < 1e-5 and row["max_weight_diff"] < 1e-5, (kind, accumulation, row)
    assert (tmp_path / "peers.png").stat().st_size > 0 and "exactness against the reference" in proc.stdout
