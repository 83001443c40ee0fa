"""FSDP2 (fully_shard, applied by the launcher) on real gloo ranks: DDP's numbers, one reduce-scatter per unit and
optimizer step, no gradient for frozen parameters, resume across world sizes.

Tolerance: per-step losses and pre-clip grad norms to 1e-5 (relative for norms), weights to 1e-5 absolute after
~14 AdamW steps at lr 3e-3, as in test_exact_accumulation: FSDP2 reduce-scatters flattened, padded shards where DDP
all-reduces buckets, so the summation order differs.
"""

import json
from pathlib import Path

import pytest
import torch

from launcher.bare_model import build_bare_model
from launcher.config import load_config
from launcher.data import prepare_splits

from conftest import check, final_weights, metrics, run_cli, run_worker, tiny_config, write_config

FROZEN = ["tok_embed.*", "blocks.0.*"]  # a frozen block (a unit of its own) and a frozen tensor in the root unit
MICRO_BATCH, ACCUMULATION = 2, 2


def equivalence_config(tmp_path: Path) -> Path:
    return write_config(
        tmp_path / "c.yaml",
        tiny_config(
            tmp_path,
            freeze=FROZEN,
            train={
                "max_grad_norm": 0.5,
                "micro_batch_size": MICRO_BATCH,
                "gradient_accumulation_steps": ACCUMULATION,
                "learning_rate": 3e-3,
                "warmup_steps": 2,
            },
        ),
    )


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory):
    """`reference(nproc)`: the config, the folder holding the DDP run on `nproc` ranks (ddp/; through the epoch's
    partial last window into the next epoch) and the initial weights (init/), and the run's length in steps.
    Made once per world size."""
    made = {}

    def reference(nproc: int) -> tuple[Path, Path, int]:
        if nproc not in made:
            tmp_path = tmp_path_factory.mktemp(f"ddp{nproc}")
            config = equivalence_config(tmp_path)
            n_train = len(prepare_splits(load_config(config).data, seed=1)[0])
            global_batch = MICRO_BATCH * ACCUMULATION * nproc
            assert n_train % global_batch != 0, "the data must leave a partial last window"
            max_steps = -(-n_train // global_batch) + 1
            check(run_cli("train", str(config), "train.max_steps=0", f"output_dir={tmp_path / 'init'}"))
            proc = check(run_cli("train", str(config), f"output_dir={tmp_path / 'ddp'}", f"train.max_steps={max_steps}", nproc=nproc))
            assert f"DDP (gloo): global batch {global_batch} " in proc.stdout
            made[nproc] = config, tmp_path, max_steps
        return made[nproc]

    return reference


@pytest.mark.parametrize("nproc, fsdp", [(2, "{}"), (2, "{sync_every_micro_step: true, reshard_after_forward: false, cpu_offload: true}"), (4, "{}")])
def test_fsdp2_matches_ddp_per_step_and_in_final_weights(tmp_path: Path, ddp_reference, nproc: int, fsdp: str):
    """Accumulation, a partial last window, clipping active, a frozen block: the same losses, pre-clip norms and lr
    per step and the same final weights as DDP, whatever the fsdp options; frozen parameters bitwise their initial
    values."""
    config, reference, max_steps = ddp_reference(nproc)
    proc = check(run_cli("train", str(config), f"output_dir={tmp_path / 'fsdp'}", f"train.max_steps={max_steps}", f"fsdp={fsdp}", nproc=nproc))
    assert f"FSDP2 (gloo): global batch {MICRO_BATCH * ACCUMULATION * nproc} " in proc.stdout
    assert ("shards offloaded to the CPU" in proc.stdout) == ("cpu_offload: true" in fsdp)
    ddp_rows = [r for r in metrics(reference / "ddp") if "loss" in r]
    fsdp_rows = [r for r in metrics(tmp_path / "fsdp") if "loss" in r]
    assert [r["step"] for r in fsdp_rows] == [r["step"] for r in ddp_rows] == list(range(1, max_steps + 1))
    assert max(r["grad_norm"] for r in ddp_rows) > 0.5, "clipping must be active in this test"
    for fsdp, ddp in zip(fsdp_rows, ddp_rows):
        assert fsdp["loss"] == pytest.approx(ddp["loss"], abs=1e-5), (fsdp, ddp)
        assert fsdp["grad_norm"] == pytest.approx(ddp["grad_norm"], rel=1e-5), (fsdp, ddp)
        assert fsdp["lr"] == ddp["lr"]
    initial, ddp_w, fsdp_w = (final_weights(p) for p in (reference / "init", reference / "ddp", tmp_path / "fsdp"))
    assert set(fsdp_w) == set(ddp_w)
    for name, tensor in ddp_w.items():
        assert fsdp_w[name].shape == tensor.shape and fsdp_w[name].dtype == torch.float32, name
        torch.testing.assert_close(fsdp_w[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    frozen = [n for n in initial if n.startswith(("tok_embed.", "blocks.0."))]
    assert len(frozen) == 12  # the embedding and the 11 tensors of blocks.0
    for name in frozen:
        assert torch.equal(fsdp_w[name], initial[name]), f"frozen {name} changed under FSDP2"


def padded_numel(shape: torch.Size, world_size: int) -> int:
    """Elements FSDP2 reduce-scatters for one gradient: dim 0 padded to a multiple of the world size."""
    rows = -(-shape[0] // world_size) * world_size
    return rows * (torch.Size(shape[1:]).numel() if len(shape) > 1 else 1)


@pytest.mark.parametrize("sync_every_micro_step", [False, True])
def test_one_reduce_scatter_per_unit_and_optimizer_step_and_none_for_frozen(tmp_path: Path, sync_every_micro_step: bool):
    """Accumulation 4: the non-final micro-steps communicate nothing, the last reduce-scatters once per unit that
    has trainable parameters (k times with sync_every_micro_step); the elements are exactly the trainable
    parameters' (padded), so the frozen block and the frozen embedding cost no traffic, and they never hold a
    gradient."""
    steps, accumulation = 3, 4
    config = write_config(
        tmp_path / "c.yaml",
        tiny_config(
            tmp_path,
            freeze=FROZEN,
            fsdp={"sync_every_micro_step": sync_every_micro_step},
            data={"eval_fraction": 0},
            train={"max_steps": steps, "gradient_accumulation_steps": accumulation},
        ),
    )
    check(run_worker("count_reduce_scatter.py", str(config), str(tmp_path / "result.json")))
    bare, _ = build_bare_model(load_config(config))
    trainable = {name: p.shape for name, p in bare.named_parameters() if p.requires_grad}
    per_sync = sum(padded_numel(shape, 2) for shape in trainable.values())
    everything = sum(padded_numel(p.shape, 2) for p in bare.parameters())
    micro_steps = range(steps * accumulation)
    sync_at = list(micro_steps) if sync_every_micro_step else [s * accumulation + accumulation - 1 for s in range(steps)]
    for rank in range(2):
        result = json.loads((tmp_path / f"result.json.rank{rank}").read_text())
        assert result["model_type"] == "FSDPGPT" and result["world_size"] == 2
        assert result["units"] == 3  # two blocks and the root
        assert result["training_forwards"] == steps * accumulation
        at = [m for m, _ in result["reduce_scatters"]]
        assert sorted(set(at)) == sync_at, at
        for m in sync_at:
            sizes = [n for mm, n in result["reduce_scatters"] if mm == m]
            assert len(sizes) == 2, sizes  # blocks.1 and the root; blocks.0 is frozen whole
            assert sum(sizes) == per_sync < everything, (sizes, per_sync, everything)
        assert result["had_gradient"] == sorted(trainable)


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_on_another_world_size_with_the_same_global_batch(tmp_path: Path, before: int, after: int):
    """Distributed Checkpoint reshards: stopped after step 3 on `before` ranks, resumed on `after` ranks with the
    accumulation that keeps the global batch; ends where the uninterrupted 2-rank run ends (1e-5; dropout off)."""
    from test_resume import run_with_signal

    config = write_config(
        tmp_path / "c.yaml",
        tiny_config(
            tmp_path,
            fsdp={},
            freeze=["pos_embed.*"],
            checkpoint={"every_steps": 3},
            train={"max_steps": 6, "gradient_accumulation_steps": 2, "micro_batch_size": 4},
        ),
    )
    check(run_cli("train", str(config), f"output_dir={tmp_path / 'straight'}", nproc=2))
    accumulation = {1: 4, 2: 2}
    last_micro_step_of_step_3 = 3 * accumulation[before] - 1
    stopped = run_with_signal(
        config, last_micro_step_of_step_3, before, f"output_dir={tmp_path / 'moved'}", f"train.gradient_accumulation_steps={accumulation[before]}"
    )
    assert stopped.returncode != 0, stopped.stderr[-3000:]
    assert json.loads((tmp_path / "moved" / "preempted.json").read_text())["step"] == 3
    resumed = check(
        run_cli(
            "train",
            str(config),
            f"output_dir={tmp_path / 'moved'}",
            "resume=auto",
            f"train.gradient_accumulation_steps={accumulation[after]}",
            nproc=after,
        )
    )
    assert "resumed from" in resumed.stdout and f"world size {after}" in resumed.stdout
    straight, moved = final_weights(tmp_path / "straight"), final_weights(tmp_path / "moved")
    for name, tensor in straight.items():
        torch.testing.assert_close(moved[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_fsdp_with_deepspeed_is_refused_in_one_line(tmp_path: Path):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, fsdp={}, deepspeed="configs/deepspeed/zero2.json"))
    proc = run_cli("train", str(config))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "fsdp and deepspeed both choose the backend; keep one of them" in lines[0], lines


def test_one_process_fsdp2_gives_ddp_numbers_per_layer_norms_and_dumped_gradients(tmp_path: Path):
    """One rank (a process group of one): the sharded path's norms (per parameter, combined over ranks), its
    clipping over DTensor shards and --dump-grad's gathered gradient equal one DDP process's."""
    name = "blocks.1.qkv.weight"
    config = write_config(
        tmp_path / "c.yaml",
        tiny_config(tmp_path, freeze=FROZEN, train={"max_steps": 3, "max_grad_norm": 0.5}, diagnostics={"dump_grad": [name], "grad_norms_every": 1}),
    )
    check(run_cli("train", str(config), f"output_dir={tmp_path / 'ddp'}"))
    proc = check(run_cli("train", str(config), f"output_dir={tmp_path / 'fsdp'}", "fsdp={}"))
    assert "FSDP2 (gloo): global batch 4 " in proc.stdout
    assert "FSDP2: fully_shard on 2 Block block(s) and the root over 1 rank(s)" in proc.stdout
    ddp_rows, fsdp_rows = metrics(tmp_path / "ddp"), metrics(tmp_path / "fsdp")
    assert [sorted(r) for r in fsdp_rows] == [sorted(r) for r in ddp_rows]
    for fsdp, ddp in zip(fsdp_rows, ddp_rows):
        if "loss" in ddp:
            assert ddp["grad_norm"] > 0.5 and fsdp["loss"] == pytest.approx(ddp["loss"], abs=1e-6)
            assert fsdp["grad_norm"] == pytest.approx(ddp["grad_norm"], rel=1e-6)
        if "grad_norm_by_layer" in ddp:
            assert fsdp["grad_norm_by_layer"] == pytest.approx(ddp["grad_norm_by_layer"], rel=1e-6)
            assert "blocks.0" not in ddp["grad_norm_by_layer"] and "blocks.1" in ddp["grad_norm_by_layer"]  # trainable only
        if "grad" in ddp:
            assert fsdp["grad"][name] == pytest.approx(ddp["grad"][name], rel=1e-6, abs=1e-9)
    ddp_w, fsdp_w = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "fsdp")
    for key, tensor in ddp_w.items():
        torch.testing.assert_close(fsdp_w[key], tensor, rtol=0, atol=1e-6, msg=key)


def test_fsdp2_shards_hf_decoder_layers_and_exports_a_folder_that_loads(tiny_hf, tmp_path: Path):
    """A Hugging Face model: its _no_split_modules class (LlamaDecoderLayer) is the unit; final/ is a
    from_pretrained folder with DDP's weights."""
    from transformers import AutoModelForCausalLM

    from conftest import hf_config

    config = write_config(tmp_path / "c.yaml", hf_config(tmp_path, tiny_hf["llama"], train={"max_steps": 3}))
    check(run_cli("train", str(config), f"output_dir={tmp_path / 'ddp'}"))
    proc = check(run_cli("train", str(config), f"output_dir={tmp_path / 'fsdp'}", "fsdp={}"))
    assert "FSDP2: fully_shard on 2 LlamaDecoderLayer block(s) and the root" in proc.stdout
    ddp = AutoModelForCausalLM.from_pretrained(tmp_path / "ddp" / "final").state_dict()
    fsdp = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "final").state_dict()
    assert set(fsdp) == set(ddp)
    for key, tensor in ddp.items():
        torch.testing.assert_close(fsdp[key], tensor, rtol=0, atol=1e-6, msg=key)


def test_accelerate_config_selects_fsdp2(tmp_path: Path):
    """`accelerate launch --config_file configs/accelerate/fsdp2.yaml` trains exactly as the config key does: the
    launcher shards (Accelerate is not told of FSDP, so it cannot hand back a DDP model)."""

    from conftest import REPO

    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, train={"max_steps": 3}))
    accelerate_config = REPO / "configs" / "accelerate" / "fsdp2.yaml"
    proc = check(run_cli("train", str(config), f"output_dir={tmp_path / 'via_accelerate'}", nproc=2, accelerate_config=accelerate_config))
    assert "FSDP2 (gloo): global batch 8 " in proc.stdout, proc.stdout[-2000:]
    check(run_cli("train", str(config), f"output_dir={tmp_path / 'via_key'}", "fsdp={}", nproc=2))
    a, b = final_weights(tmp_path / "via_accelerate"), final_weights(tmp_path / "via_key")
    assert all(torch.equal(a[name], b[name]) for name in b)


@pytest.mark.parametrize("backend, nproc", [("DDP", 2), ("FSDP2", 2), ("FSDP2", 1)])
def test_planned_bytes_per_rank_are_what_a_run_allocates(tmp_path: Path, backend: str, nproc: int):
    """`launcher plan`'s per-rank bytes of parameters, gradients and AdamW moments, from the meta model, against the
    storage a real CPU run allocates (the vocabulary, 257 rows, shards unevenly: rank 0 holds the padded share)."""
    from launcher.bare_model import inspection_model
    from launcher.memory import model_states

    from conftest import run_worker

    sections = {"fsdp": {}} if backend == "FSDP2" else {}
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, freeze=["pos_embed.*"], train={"max_steps": 1}, **sections))
    check(run_worker("measure_memory.py", str(config), str(tmp_path / "result.json"), nproc=nproc))
    planned = model_states(inspection_model(load_config(config))[0], nproc)[backend]
    for rank in range(nproc):
        measured = json.loads((tmp_path / f"result.json.rank{rank}").read_text())
        got = (measured["parameters"], measured["gradients"], measured["optimizer"])
        if rank == 0:
            assert got == planned, (got, planned)
        else:  # the last shard of an uneven dim 0 is shorter where the moments are allocated unpadded
            assert got[:2] == planned[:2] and got[2] <= planned[2], (got, planned)
    plan = check(run_cli("plan", str(config), "--gpus-per-node", str(nproc), "--compare-backends"))
    assert f"  {backend:<8} " in plan.stdout and "<- this run" in plan.stdout


def test_bf16_is_fsdp2s_mixed_precision_policy_with_fp32_master_weights(tmp_path: Path):
    """train.mixed_precision: bf16 becomes MixedPrecisionPolicy(bf16 compute, fp32 reduction): the losses follow
    DDP's autocast run to bf16 precision, and the weights trained and exported are fp32."""
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, train={"max_steps": 3, "mixed_precision": "bf16"}))
    check(run_cli("train", str(config), f"output_dir={tmp_path / 'ddp'}"))
    proc = check(run_cli("train", str(config), f"output_dir={tmp_path / 'fsdp'}", "fsdp={}"))
    assert "computed in bf16 (FSDP2's mixed-precision policy)" in proc.stdout
    assert "compute in bf16, reduction in fp32" in proc.stdout
    ddp_rows = [r for r in metrics(tmp_path / "ddp") if "loss" in r]
    fsdp_rows = [r for r in metrics(tmp_path / "fsdp") if "loss" in r]
    for fsdp, ddp in zip(fsdp_rows, ddp_rows, strict=True):
        assert fsdp["loss"] == pytest.approx(ddp["loss"], abs=5e-3), (fsdp, ddp)
    assert all(t.dtype == torch.float32 for t in final_weights(tmp_path / "fsdp").values())
