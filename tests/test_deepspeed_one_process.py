"""A one-process DeepSpeed run from a plain `launcher train` (the DeepSpeed guide's example) needs no MPI (mpi4py is not
installed here) and trains what one plain process trains."""

from pathlib import Path

import pytest
import torch

from conftest import check, final_weights, metrics, run_cli, tiny_config, write_config


def test_one_process_deepspeed_without_mpi_matches_one_plain_process(tmp_path: Path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra: scripts/setup deepspeed,dev")
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    check(run_cli("train", str(config), f"output_dir={tmp_path / 'plain'}"))
    proc = check(run_cli("train", str(config), f"output_dir={tmp_path / 'zero2'}", "deepspeed=configs/deepspeed/zero2.json"))
    assert "DeepSpeed ZeRO-2: global batch 4 = micro-batch 2 x accumulation 2 x world size 1" in proc.stdout
    plain, zero2 = final_weights(tmp_path / "plain"), final_weights(tmp_path / "zero2")
    for name, tensor in plain.items():
        torch.testing.assert_close(zero2[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    losses = [[r["loss"] for r in metrics(tmp_path / run) if "loss" in r] for run in ("plain", "zero2")]
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5, atol=1e-6)
