"""Debugging before a big run: --debug (the same loop, one process), --overfit-batches, --simulate-world-size."""

from pathlib import Path

import torch
import yaml

from launcher.config import load_config
from launcher.data import prepare_splits

from conftest import check, final_weights, metrics, run_cli, tiny_config, write_config


def test_debug_mode_runs_the_same_loop_on_one_process_and_summarizes(tmp_path: Path):
    """A config made for 2 processes, debugged as one plain process: 3 steps, checked after each, a summary;
    its weights are bitwise those of a normal 3-step run of the same config on one process."""
    config = write_config(
        tmp_path / "c.yaml", tiny_config(tmp_path, launch={"nproc_per_node": 2}, freeze=["pos_embed.*"], train={"max_steps": 50, "log_every": 10})
    )
    proc = check(run_cli("train", str(config), "--debug", "--debug-steps", "3"))
    debug_out = tmp_path / "out-debug"
    summary = proc.stdout[proc.stdout.index("debug summary") :]
    assert "3 steps on one process (cpu); global batch 4 = micro-batch 2 x accumulation 2 x world size 1" in summary
    assert "deterministic algorithms on" in summary
    assert "every loss and gradient finite, checked after each of 3 steps" in summary
    assert "parameters: 26 trainable (26 changed), 1 frozen (1 unchanged)" in summary
    assert "gradient norm by layer at step 3: tok_embed " in summary and "WARNING" not in summary
    assert "pos_embed.weight" in proc.stdout and "frozen" in proc.stdout  # the parameter listing
    rows = metrics(debug_out)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]  # a row, and so a check, after every step
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 3]
    assert not (tmp_path / "out").exists()

    check(run_cli("train", str(config), "train.max_steps=3", "launch.nproc_per_node=1"))
    normal = final_weights(tmp_path / "out")
    for name, tensor in final_weights(debug_out).items():
        assert torch.equal(tensor, normal[name]), name

    again = check(run_cli("train", str(config), "--debug", "--debug-steps", "2", "--detect-anomaly"))  # replaces the last one
    assert [r["step"] for r in metrics(debug_out) if "loss" in r] == [1, 2]
    assert "anomaly detection on" in again.stdout
    assert yaml.safe_load((debug_out / "config.yaml").read_text())["diagnostics"]["detect_anomaly"] is True

    plotted = check(run_cli("plot", str(debug_out)))
    charts = ["loss", "lr", "grad_norm", "throughput", "overview", "grad_norm_by_layer"]
    assert plotted.stdout.split() == [str(debug_out / "plots" / f"{name}.png") for name in charts]
    assert all((debug_out / "plots" / f"{name}.png").stat().st_size > 10_000 for name in charts)
    missing = run_cli("plot", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "not found" in missing.stderr


def test_overfit_one_batch_drives_the_loss_near_zero(tmp_path: Path):
    """The can-it-learn check: the built-in GPT memorizes one optimizer step's batch."""
    config = write_config(
        tmp_path / "c.yaml",
        tiny_config(
            tmp_path,
            model={"n_layer": 2, "n_head": 2, "d_model": 64},
            train={
                "max_steps": 150,
                "learning_rate": 1e-2,
                "warmup_steps": 10,
                "lr_schedule": "constant",
                "log_every": 10,
                "max_grad_norm": 1.0,
                "weight_decay": 0.0,
            },
        ),
    )
    check(run_cli("train", str(config), "--overfit-batches", "1"))
    losses = [r["loss"] for r in metrics(tmp_path / "out") if "loss" in r]
    assert losses[0] > 3.0 and losses[-1] < 0.05, losses


def test_one_process_simulating_two_ranks_equals_a_real_two_rank_run(tmp_path: Path):
    """--simulate-world-size 2 on one process and 2 real gloo ranks: the same global batch of 8 (2 x 2 x 2), the
    same samples per step through a partial last window and into the next epoch, clipping active. Per-step
    losses and grad norms agree to 1e-5 and the weights to 1e-5 (the sums run in a different order)."""
    config = write_config(
        tmp_path / "c.yaml", tiny_config(tmp_path, train={"max_grad_norm": 0.5, "micro_batch_size": 2, "gradient_accumulation_steps": 2})
    )
    n_train = len(prepare_splits(load_config(config).data, seed=1)[0])
    assert n_train % 8 != 0, "the data must leave a partial last window"
    max_steps = -(-n_train // 8) + 2
    config = write_config(
        config, {**yaml.safe_load(config.read_text()), "train": {**yaml.safe_load(config.read_text())["train"], "max_steps": max_steps}}
    )
    real = check(run_cli("train", str(config), "output_dir=" + str(tmp_path / "real"), nproc=2))
    # an override may follow the flags too (as in the first-run guide's commands)
    simulated = check(run_cli("train", str(config), "--simulate-world-size", "2", "output_dir=" + str(tmp_path / "sim")))
    assert "global batch 8 = micro-batch 2 x accumulation 2 x world size 2 (simulated by one process: 4 micro-steps)" in simulated.stdout
    assert "DDP (gloo): global batch 8 = micro-batch 2 x accumulation 2 x world size 2;" in real.stdout
    real_rows = [r for r in metrics(tmp_path / "real") if "loss" in r]
    sim_rows = [r for r in metrics(tmp_path / "sim") if "loss" in r]
    assert len(real_rows) == len(sim_rows) == max_steps
    assert max(r["grad_norm"] for r in real_rows) > 0.5, "clipping must be active in this test"
    for a, b in zip(sim_rows, real_rows):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-5 * b["grad_norm"], (a, b)
    reference = final_weights(tmp_path / "real")
    for name, tensor in final_weights(tmp_path / "sim").items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-4, atol=1e-5, msg=name)
