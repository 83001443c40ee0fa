"""GPU-only paths: fp16 loss scaling (Accelerate uses no GradScaler on CPU), bf16 and torch.compile on CUDA."""

from pathlib import Path

import pytest
import torch

from launcher.build import build_run
from launcher.config import load_config
from launcher.loop import train
from launcher.optim import lr_factor

from conftest import final_weights, metrics, tiny_config, write_config

pytestmark = pytest.mark.gpu


def make_run(tmp_path: Path, **sections):
    tmp_path.mkdir(parents=True, exist_ok=True)
    return build_run(load_config(write_config(tmp_path / "c.yaml", tiny_config(tmp_path, **sections))), overwrite=True)


def test_fp16_overflow_steps_are_skipped_counted_and_do_not_advance_the_schedule(tmp_path: Path, fresh_accelerate):
    steps = 30
    run = make_run(
        tmp_path,
        model={"factory": "factories:overflowing_gpt"},
        train={"mixed_precision": "fp16", "max_steps": steps, "warmup_steps": 40, "max_grad_norm": 1.0},
    )
    summary = train(run)
    rows = [r for r in metrics(run.cfg.output_dir) if "loss" in r]
    skipped = summary.skipped_steps
    assert 1 <= skipped < steps, summary
    assert rows[-1]["skipped_steps"] == skipped
    assert summary.nonfinite is None and summary.nonfinite_steps == 0  # overflow skips are not non-finite errors
    assert run.lr_schedule.last_epoch == steps - skipped  # the schedule counts only steps that were taken
    # the lr logged at each step is the warmup value for the number of steps taken before it
    taken = 0
    for row in rows:
        assert row["lr"] == pytest.approx(run.cfg.train.learning_rate * lr_factor(taken, steps, run.cfg.train))
        taken = row["step"] - row["skipped_steps"]
    assert all(torch.isfinite(t).all() for t in final_weights(run.cfg.output_dir).values())


def test_bf16_trains_with_fp32_master_weights(tmp_path: Path, fresh_accelerate):
    run = make_run(tmp_path, train={"mixed_precision": "bf16", "max_steps": 20}, eval={"at_start": True})
    summary = train(run)
    assert summary.eval_loss < summary.first_eval_loss
    assert all(t.dtype == torch.float32 for t in final_weights(run.cfg.output_dir).values())


@pytest.mark.parametrize("compile_model, precision", [(False, "no"), (True, "bf16")])
def test_no_host_device_sync_per_step(tmp_path: Path, fresh_accelerate, compile_model: bool, precision: str):
    """CUDA's sync debug mode flags every synchronizing call: a run of 8 steps must make no more of them than a
    run of 4 (one log row at the end of each, with its mfu and peak-memory reads), so nothing in a micro-step or a
    step waits for the GPU: eager fp32, and compiled bf16 (each run compiles its own model once)."""
    import warnings

    from conftest import reset_accelerate

    counts = []
    for steps in (2, 4, 8):  # the first run pays one-time initialization (CUDA context, cuBLAS) and is not compared
        run = make_run(
            tmp_path / str(steps),
            data={"eval_fraction": 0},
            train={
                "max_steps": steps,
                "log_every": 1000,
                "gradient_accumulation_steps": 4,
                "compile": compile_model,
                "mixed_precision": precision,
                "peak_tflops": 100.0,
            },
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train(run)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
        reset_accelerate()
    assert counts[1] == counts[2], counts


def test_mfu_and_peak_memory_rows(tmp_path: Path, fresh_accelerate):
    """Each metrics row holds mfu (train.peak_tflops here, so the number is checkable on any card) and this
    interval's peak memory: the peak is reset per interval, so a later interval need not repeat an earlier peak."""
    from launcher.flops import flops_per_token

    run = make_run(
        tmp_path, train={"mixed_precision": "bf16", "max_steps": 6, "log_every": 2, "peak_tflops": 100.0}, eval={"every_steps": 3, "at_start": True}
    )
    train(run)
    rows = [r for r in metrics(run.cfg.output_dir) if "loss" in r]
    per_token = flops_per_token(run.accelerator.unwrap_model(run.model), run.cfg.data.seq_len)
    for row in rows:
        assert row["mfu"] == pytest.approx(row["tokens_per_s"] * per_token / 100e12, rel=1e-9)
        assert 0 < row["max_memory_allocated_gb"] <= row["max_memory_reserved_gb"]
    print("peak memory per interval (GiB):", [(r["max_memory_allocated_gb"], r["max_memory_reserved_gb"]) for r in rows])


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_deepspeed_on_one_gpu(tmp_path: Path, stage: int, precision: str):
    """ZeRO-2/3 with bf16 and fp16 on one GPU (torchrun, 1 process): finite losses, fp32 exported weights;
    under fp16 the overflowing model makes the loss scaler skip steps, which are counted."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra: scripts/setup deepspeed,dev")
    from conftest import check, run_cli

    overrides = [f"deepspeed=configs/deepspeed/zero{stage}.json", f"train.mixed_precision={precision}", "train.max_steps=12"]
    if precision == "fp16":
        overrides.append("model.factory=factories:overflowing_gpt")
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    proc = check(run_cli("train", str(config), *overrides, nproc=1, launcher="torchrun", gpu=True, timeout=600))
    assert f"DeepSpeed ZeRO-{stage}: " in proc.stdout
    rows = [r for r in metrics(tmp_path / "out") if "loss" in r]
    assert len(rows) == 12
    weights = final_weights(tmp_path / "out")
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())
    if precision == "fp16":
        assert 1 <= rows[-1]["skipped_steps"] < 12, rows[-1]
        print(f"ZeRO-{stage} fp16: {rows[-1]['skipped_steps']} of 12 steps skipped for overflow")
    else:
        assert rows[-1]["skipped_steps"] == 0 and rows[-1]["loss"] < rows[0]["loss"]
    print(f"ZeRO-{stage} {precision}: losses {[round(r['loss'], 3) for r in rows]}")


@pytest.mark.parametrize("variant", ["bf16 autocast", "bf16 autocast + LoRA", "pure bf16 weights"])
def test_hf_model_in_bf16_on_the_gpu(tmp_path: Path, tiny_hf, variant: str, fresh_accelerate):
    """A tiny Llama (a bf16 checkpoint) on CUDA: fp32 master weights under bf16 autocast (with and without LoRA), or
    pure bf16 weights when model.dtype asks; finite losses that go down, an export that loads."""
    import transformers

    from conftest import hf_config

    sections = {"train": {"mixed_precision": "bf16", "max_steps": 12, "learning_rate": 3e-3}, "eval": {"at_start": True}}
    if variant.endswith("LoRA"):
        sections["lora"] = {"r": 4, "target_modules": ["q_proj", "v_proj"]}
    if variant.startswith("pure"):
        sections["model"] = {"dtype": "bf16"}
    tmp_path.mkdir(parents=True, exist_ok=True)
    run = build_run(load_config(write_config(tmp_path / "c.yaml", hf_config(tmp_path, tiny_hf["llama"], **sections))))
    masters = {p.dtype for p in run.accelerator.unwrap_model(run.model).parameters() if p.requires_grad}
    assert masters == ({torch.bfloat16} if variant.startswith("pure") else {torch.float32}), masters
    summary = train(run)
    assert summary.eval_loss < summary.first_eval_loss, summary
    final = tmp_path / "out" / "final"
    if variant.endswith("LoRA"):
        assert (final / "adapter_model.safetensors").is_file()
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(final)
        assert model.dtype == torch.float32 and all(torch.isfinite(p).all() for p in model.parameters())


def test_fsdp2_bf16_on_one_gpu(tmp_path: Path, fresh_accelerate):
    """FSDP2 on one GPU with bf16: MixedPrecisionPolicy (bf16 compute, fp32 reduction) over fp32 master shards; the run
    learns, its checkpoint is Distributed Checkpoint shards, its final weights are full fp32 tensors. Last in this
    file: FSDP2 made a process group of one in this process, which is destroyed at the end."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    try:
        run = make_run(tmp_path, fsdp={}, train={"mixed_precision": "bf16", "max_steps": 20}, eval={"at_start": True}, checkpoint={"every_steps": 20})
        assert any("compute in bf16, reduction in fp32" in note for note in run.backend.notes), run.backend.notes
        masters = [p for p in run.model.parameters() if p.requires_grad]
        assert masters and all(isinstance(p, DTensor) and p.dtype == torch.float32 and p.device.type == "cuda" for p in masters)
        summary = train(run)
        assert summary.eval_loss < summary.first_eval_loss, summary
        assert (tmp_path / "out" / "checkpoints" / "step-000000020" / "sharded").is_dir()
        final = final_weights(run.cfg.output_dir)
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in final.values())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
