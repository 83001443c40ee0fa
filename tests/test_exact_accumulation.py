"""The same global batch split three ways gives the same training, including a partial last window.

2 ranks x 4 micro-steps x 1 sample, 1 rank x 8 micro-steps x 1 sample and 1 rank x 1 micro-step x
8 samples each take 8 samples per optimizer step. On variable-length padded sequences whose count
leaves a partial window at the end of the epoch, with clipping active, they must reach the same
weights and log the same per-step losses (fp32, CPU).

Tolerance: losses and grad norms to 1e-5; weights to 1e-5 absolute after ~12 AdamW steps at lr 3e-3
(at 1e-2 some CPUs' kernels reach 1.3e-5). Summation order differs between the splits, and Adam divides
by sqrt(v), which turns float rounding in small gradient entries into differences of order 1e-6 in the
weights.
"""

from pathlib import Path

import torch

from launcher.config import load_config
from launcher.data import prepare_splits

from conftest import check, final_weights, metrics, run_cli, tiny_config, write_config

SPLITS = {  # name: (processes, micro_batch_size, gradient_accumulation_steps); all have a global batch of 8
    "2 ranks x 4 micro-steps": (2, 1, 4),
    "1 rank x 8 micro-steps": (1, 1, 8),
    "1 rank x 1 big batch": (1, 8, 1),
}


def test_global_batch_split_does_not_change_training(tmp_path: Path):
    base = tiny_config(tmp_path, train={"max_grad_norm": 0.5, "lr_schedule": "cosine", "warmup_steps": 2, "learning_rate": 3e-3})
    config_path = write_config(tmp_path / "base.yaml", base)
    n_train = len(prepare_splits(load_config(config_path).data, seed=base["seed"])[0])
    steps_per_epoch = -(-n_train // 8)
    assert n_train % 8 != 0, "the data must leave a partial last window"
    max_steps = steps_per_epoch + 2  # through the partial window and into the next (reshuffled) epoch

    results = {}
    for name, (nproc, micro, accumulation) in SPLITS.items():
        out = tmp_path / name.replace(" ", "_")
        check(
            run_cli(
                "train",
                str(config_path),
                f"output_dir={out}",
                f"train.max_steps={max_steps}",
                f"train.micro_batch_size={micro}",
                f"train.gradient_accumulation_steps={accumulation}",
                nproc=nproc,
            )
        )
        rows = [r for r in metrics(out) if "loss" in r]
        results[name] = (final_weights(out), rows)

    reference_weights, reference_rows = results["1 rank x 1 big batch"]
    assert len(reference_rows) == max_steps
    assert max(r["grad_norm"] for r in reference_rows) > 0.5, "clipping must be active in this test"
    for name, (weights, rows) in results.items():
        assert [r["step"] for r in rows] == list(range(1, max_steps + 1))
        for row, ref in zip(rows, reference_rows):
            assert abs(row["loss"] - ref["loss"]) < 1e-5, (name, row, ref)
            assert abs(row["grad_norm"] - ref["grad_norm"]) < 1e-5 * ref["grad_norm"], (name, row, ref)
        for key, tensor in reference_weights.items():
            torch.testing.assert_close(weights[key], tensor, rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")
