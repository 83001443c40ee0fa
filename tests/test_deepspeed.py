"""DeepSpeed ZeRO through Accelerate keeps the loop's exact semantics: 2 real gloo ranks on CPU against DDP.

Tolerance: per-step losses and grad norms to 1e-5 (relative for norms), weights to 1e-5 absolute
after 6 AdamW steps at lr 1e-2; DeepSpeed reduces and clips flattened fp32 partitions, so summation
order differs from DDP's buckets.
"""

import json
from pathlib import Path

import pytest
import torch

from conftest import REPO, check, final_weights, metrics, run_cli, tiny_config, write_config

pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra: scripts/setup deepspeed,dev")

FROZEN = ["tok_embed.*", "blocks.0.mlp_in.*"]


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory):
    """`reference(max_grad_norm)`: (config, folder) of the initial weights (folder/init) and of the DDP run
    (folder/ddp) every DeepSpeed stage is compared with; each made once per clipping setting."""
    made = {}

    def reference(max_grad_norm: float | None) -> tuple[Path, Path]:
        if max_grad_norm not in made:
            folder = tmp_path_factory.mktemp(f"ddp-clip-{max_grad_norm}")
            config = write_config(
                folder / "c.yaml",
                tiny_config(
                    folder,
                    freeze=FROZEN,
                    train={"max_steps": 6, "max_grad_norm": max_grad_norm, "gradient_accumulation_steps": 2, "peak_tflops": 1.0},
                ),
            )
            check(run_cli("train", str(config), "train.max_steps=0", f"output_dir={folder / 'init'}"))
            ddp = check(run_cli("train", str(config), f"output_dir={folder / 'ddp'}", nproc=2))
            assert "DDP (gloo): global batch 8 " in ddp.stdout
            made[max_grad_norm] = config, folder
        return made[max_grad_norm]

    return reference


@pytest.mark.parametrize(
    "stage_json, max_grad_norm",
    [("zero1.json", 0.5), ("zero2.json", 0.5), ("zero3.json", 0.5), ("zero2.json", None), ("zero3.json", None), ("zero3_offload.json", 0.5)],
)
def test_deepspeed_matches_ddp(ddp_reference, tmp_path: Path, stage_json: str, max_grad_norm: float | None):
    """Same per-step losses, pre-clip grad norms (read from the engine, with and without clipping) and lr;
    same exported weights; frozen parameters bitwise unchanged. With the optimizer offloaded, DeepSpeed's CPU Adam
    makes the updates."""
    config, reference = ddp_reference(max_grad_norm)
    # offload: DeepSpeed's CPU Adam op, compiled by scripts/setup; a first use without it compiles it (minutes)
    timeout = 900 if "offload" in stage_json else 300
    ds = check(
        run_cli(
            "train",
            str(config),
            f"output_dir={tmp_path / 'ds'}",
            f"deepspeed={REPO / 'configs' / 'deepspeed' / stage_json}",
            nproc=2,
            timeout=timeout,
        )
    )
    stage = stage_json.removeprefix("zero").removesuffix(".json").removesuffix("_offload")
    assert f"DeepSpeed ZeRO-{stage}: global batch 8 " in ds.stdout  # Accelerate really built the engine
    if "offload" in stage_json:
        assert "optimizer offloaded to the CPU: DeepSpeedCPUAdam, 1 thread(s) per process" in ds.stdout, ds.stdout[-2000:]
    ddp_rows = [r for r in metrics(reference / "ddp") if "loss" in r]
    ds_rows = [r for r in metrics(tmp_path / "ds") if "loss" in r]
    assert [r["step"] for r in ds_rows] == [r["step"] for r in ddp_rows] == list(range(1, 7))
    if max_grad_norm is not None:
        assert max(r["grad_norm"] for r in ddp_rows) > max_grad_norm, "clipping must be active in this test"
    for ds, ddp in zip(ds_rows, ddp_rows):
        assert ds["loss"] == pytest.approx(ddp["loss"], abs=1e-5), (ds, ddp)
        assert ds["grad_norm"] == pytest.approx(ddp["grad_norm"], rel=1e-5), (ds, ddp)
        assert ds["lr"] == pytest.approx(ddp["lr"], rel=1e-12)
        # the same model FLOPs per token, read from ZeRO-3's partitioned parameters too
        assert ds["mfu"] / ds["tokens_per_s"] == pytest.approx(ddp["mfu"] / ddp["tokens_per_s"], rel=1e-12)
    initial, ddp_w, ds_w = final_weights(reference / "init"), final_weights(reference / "ddp"), final_weights(tmp_path / "ds")
    assert set(ds_w) == set(ddp_w)
    for name, tensor in ddp_w.items():
        assert ds_w[name].shape == tensor.shape and ds_w[name].dtype == torch.float32, name
        torch.testing.assert_close(ds_w[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    for name in ("tok_embed.weight", "blocks.0.mlp_in.weight", "blocks.0.mlp_in.bias"):
        assert torch.equal(ds_w[name], initial[name]), f"frozen {name} changed under DeepSpeed"


MISMATCHES = {  # name: (JSON entries, launcher overrides, expected line)
    "micro-batch": (
        {"train_micro_batch_size_per_gpu": 4},
        ["train.micro_batch_size=2"],
        "train_micro_batch_size_per_gpu is 4 but train.micro_batch_size gives 2",
    ),
    "accumulation": (
        {"gradient_accumulation_steps": 8},
        ["train.gradient_accumulation_steps=2"],
        "gradient_accumulation_steps is 8 but train.gradient_accumulation_steps gives 2",
    ),
    "clipping": ({"gradient_clipping": 1.0}, ["train.max_grad_norm=0.5"], "gradient_clipping is 1.0 but train.max_grad_norm gives 0.5"),
    "clipping off": ({"gradient_clipping": 1.0}, ["train.max_grad_norm=null"], "gradient_clipping is 1.0 but train.max_grad_norm gives 0.0"),
    "precision": ({"bf16": {"enabled": True}}, ["train.mixed_precision=no"], "bf16.enabled is true but train.mixed_precision gives false"),
}


def write_deepspeed_json(path: Path, **entries) -> Path:
    config = json.loads((REPO / "configs" / "deepspeed" / "zero2.json").read_text())
    config.update(entries)
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("name", MISMATCHES)
def test_a_disagreeing_deepspeed_value_is_refused(tmp_path: Path, name: str):
    entries, overrides, expected = MISMATCHES[name]
    ds_json = write_deepspeed_json(tmp_path / "ds.json", **entries)
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, deepspeed=str(ds_json), launch={"nproc_per_node": 2}))
    proc = run_cli("train", str(config), *overrides)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launcher: error: "), proc.stderr[-2000:]
    assert expected in lines[0] and str(ds_json) in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_under_torchrun_the_mismatch_is_reported_once_by_rank_0(tmp_path: Path):
    ds_json = write_deepspeed_json(tmp_path / "ds.json", gradient_clipping=1.0)
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, deepspeed=str(ds_json)))
    proc = run_cli("train", str(config), "train.max_grad_norm=0.5", nproc=2)
    assert proc.returncode != 0  # torchrun's own exit code for a failed worker (1); the workers exit 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("launcher: error:")]
    assert len(lines) == 1 and "gradient_clipping is 1.0 but train.max_grad_norm gives 0.5" in lines[0]
    assert "exitcode  : 2" in proc.stderr  # torchrun then prints its own failure report
    assert not (tmp_path / "out").exists()


def test_every_mismatch_is_listed_before_any_process_starts(tmp_path: Path):
    ds_json = write_deepspeed_json(
        tmp_path / "ds.json",
        train_micro_batch_size_per_gpu=4,
        gradient_accumulation_steps=8,
        gradient_clipping=1.0,
        fp16={"enabled": True},
        optimizer={"type": "Adam"},
        train_batch_size=999,
    )
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, deepspeed=str(ds_json), launch={"nproc_per_node": 2}))
    proc = run_cli("train", str(config), "train.max_grad_norm=0.5")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 6, lines  # optimizer, micro-batch, accumulation, global batch, clipping, fp16
    assert all(line.startswith("launcher: error: ") for line in lines)
    assert (
        "remove 'optimizer'" in lines[0]
        and "train_batch_size is 999 but train.micro_batch_size x train.gradient_accumulation_steps x world size gives 8" in proc.stderr
    )


def test_accelerate_config_selects_deepspeed(tmp_path: Path):
    """`accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml` trains exactly as the config key does."""
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, train={"max_steps": 3}))
    accelerate_config = REPO / "configs" / "accelerate" / "deepspeed_zero2.yaml"
    proc = check(run_cli("train", str(config), f"output_dir={tmp_path / 'via_accelerate'}", nproc=2, accelerate_config=accelerate_config))
    assert "DeepSpeed ZeRO-2: global batch 8 " in proc.stdout
    check(run_cli("train", str(config), f"output_dir={tmp_path / 'via_key'}", "deepspeed=configs/deepspeed/zero2.json", nproc=2))
    a, b = final_weights(tmp_path / "via_accelerate"), final_weights(tmp_path / "via_key")
    assert all(torch.equal(a[name], b[name]) for name in b)
