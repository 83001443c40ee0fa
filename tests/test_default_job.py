"""The built-in default job, shortened: a plain `launcher train` starts 2 gloo processes on a CPU machine."""

from pathlib import Path

from conftest import check, final_weights, metrics, run_cli


def test_default_job_learns_on_two_cpu_processes(tmp_path: Path):
    out = tmp_path / "default"
    proc = check(
        run_cli(
            "train", "configs/default.yaml", f"output_dir={out}", "train.max_steps=40", "train.warmup_steps=5", "eval.every_steps=20", timeout=600
        )
    )
    assert "world size 2" in proc.stdout  # launch.nproc_per_node: auto -> 2 CPU processes
    rows = metrics(out)
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) == 3  # at step 0, 20 and 40
    assert evals[-1] < evals[0] - 1.0, evals  # from ~5.5 (uniform over 257 bytes) to well below
    assert "pos_embed.weight" in final_weights(out)
    assert f"outputs: {out}" in proc.stdout and "eval loss" in proc.stdout
