"""The resume contract: a run never destroys work it did not write, resumes only what it was asked to train
(changes listed, or allowed and then really applied), branches safely from an older checkpoint, refuses an
incomplete checkpoint, and survives a torn metrics line."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import check, disk_snapshot, final_weights, hf_config, metrics, run_cli, tiny_config, write_config


def one_error_line(proc, code: int = 2) -> str:
    assert proc.returncode == code, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launcher: error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """A finished 4-step run (constant LR 0.01) with checkpoints at steps 2 and 4 and final weights."""
    tmp_path = tmp_path_factory.mktemp("finished")
    config = write_config(
        tmp_path / "c.yaml", tiny_config(tmp_path, train={"lr_schedule": "constant", "warmup_steps": 0}, checkpoint={"every_steps": 2})
    )
    check(run_cli("train", str(config)))
    return config, tmp_path / "out"


def copy_run(out: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    return copy


def test_a_finished_run_survives_resume_auto_byte_for_byte(tmp_path: Path, finished):
    config, out = finished
    out = copy_run(out, tmp_path)
    before = disk_snapshot(out)
    for flags in ([], ["--overwrite"]):  # --overwrite does not delete a run that resume=auto continues
        proc = check(run_cli("train", str(config), f"output_dir={out}", "resume=auto", *flags))
        assert "holds this run, finished" in proc.stdout and "Traceback" not in proc.stderr
        assert disk_snapshot(out) == before
    # without checkpoints, a finished run is reported too; asked to train further, it is refused (nothing to continue)
    shutil.rmtree(out / "checkpoints")
    before = disk_snapshot(out)
    assert "finished" in check(run_cli("train", str(config), f"output_dir={out}", "resume=auto")).stdout
    line = one_error_line(run_cli("train", str(config), f"output_dir={out}", "resume=auto", "train.max_steps=6"))
    assert "holds a finished run without checkpoints" in line and "--overwrite" in line
    assert disk_snapshot(out) == before


def test_resume_auto_without_a_checkpoint_is_refused_like_any_non_empty_folder(tmp_path: Path):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("a person's file\n")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    before = disk_snapshot(tmp_path)
    line = one_error_line(run_cli("train", str(config), "resume=auto"))
    assert "holds no checkpoint to resume" in line and "--overwrite" in line
    assert disk_snapshot(tmp_path) == before
    check(run_cli("train", str(config), "resume=auto", "--overwrite"))  # replaces the run's own files only
    assert (out / "notes.txt").read_text() == "a person's file\n"
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3, 4]


def test_a_changed_config_is_refused_with_every_difference(tmp_path: Path, finished):
    config, out = finished
    out = copy_run(out, tmp_path)
    before = disk_snapshot(out)
    line = one_error_line(
        run_cli(
            "train",
            str(config),
            f"output_dir={out}",
            "resume=auto",
            "train.max_steps=6",
            "train.learning_rate=0.005",
            "seed=2",
            "data.shuffle=false",
            "train.log_every=2",
        )
    )
    assert f"the config differs from checkpoint '{out / 'checkpoints' / 'step-000000004'}'" in line
    for difference in ("train.learning_rate 0.01 -> 0.005", "seed 1 -> 2", "data.shuffle True -> False"):
        assert difference in line, line
    assert "train.log_every" not in line and "max_steps" not in line.split("resume_allow_changes")[0]  # free to change
    assert "resume_allow_changes=[" in line
    # a checkpoint past the run's end is refused too
    line = one_error_line(run_cli("train", str(config), f"output_dir={out}", "resume=auto", "train.max_steps=3"))
    assert "is at step 4, past the end of this run" in line and "set train.max_steps to 4 or more" in line
    assert disk_snapshot(out) == before


def test_an_allowed_learning_rate_change_is_the_next_steps_learning_rate(tmp_path: Path, finished):
    """From the same checkpoint, step 5 with LR 0.005 moves every weight exactly half as far as with LR 0.01
    (AdamW's update, weight decay included, is proportional to the LR at equal gradients and moments)."""
    config, out = finished
    start = final_weights(out)
    runs = {}
    for lr in (0.01, 0.005):
        copy = tmp_path / f"lr-{lr}"
        shutil.copytree(out, copy)
        proc = check(
            run_cli(
                "train",
                str(config),
                f"output_dir={copy}",
                "resume=auto",
                "train.max_steps=5",
                f"train.learning_rate={lr}",
                "resume_allow_changes=[train.learning_rate]",
            )
        )
        assert f"resumed from {copy / 'checkpoints' / 'step-000000004'} at step 4" in proc.stdout
        runs[lr] = final_weights(copy)
        assert [r["lr"] for r in metrics(copy) if "loss" in r] == [0.01] * 4 + [lr]
        assert json.loads(json.dumps(metrics(copy)[-1]))["step"] == 5
    assert "changed since the checkpoint: train.max_steps 4 -> 5, train.learning_rate 0.01 -> 0.005 (resume_allow_changes)" in proc.stdout
    for name, before in start.items():
        full, half = runs[0.01][name] - before, runs[0.005][name] - before
        torch.testing.assert_close(half, full / 2, rtol=1e-3, atol=3e-7, msg=name)  # atol: float32 rounding of w + update
    assert any((runs[0.01][name] != before).any() for name, before in start.items())


def test_resuming_an_older_checkpoint_starts_a_branch_that_keep_last_never_deletes(tmp_path: Path):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, train={"max_steps": 6}, checkpoint={"every_steps": 1, "keep_last": 3}))
    out = tmp_path / "out"
    check(run_cli("train", str(config)))
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000000004", "step-000000005", "step-000000006"]
    old_branch = {name: disk_snapshot(root / name) for name in ("step-000000005", "step-000000006")}

    proc = check(run_cli("train", str(config), f"resume={root / 'step-000000004'}", "train.max_steps=8"))
    assert "a new branch from step-000000004" in proc.stdout
    assert sorted(p.name for p in root.iterdir()) == ["branch-1", "step-000000006", "step-000000007", "step-000000008"]
    assert {name: disk_snapshot(root / "branch-1" / name) for name in old_branch} == old_branch  # moved, never deleted
    assert [r["step"] for r in metrics(out) if "loss" in r] == list(range(1, 9))

    proc = check(run_cli("train", str(config), "resume=auto", "train.max_steps=9"))
    assert f"resumed from {root / 'step-000000008'} at step 8" in proc.stdout  # the newest branch continues

    # back to the set-aside branch; --overwrite must not delete the checkpoint it resumes, nor anything else
    proc = check(run_cli("train", str(config), f"resume={root / 'branch-1' / 'step-000000006'}", "train.max_steps=7", "--overwrite"))
    assert "--overwrite ignored" in proc.stdout
    assert sorted(p.name for p in (root / "branch-2").iterdir()) == ["step-000000007", "step-000000008", "step-000000009"]
    assert {name: disk_snapshot(root / "branch-1" / name) for name in old_branch} == old_branch


def test_a_torn_metrics_line_is_cut_back_on_resume(tmp_path: Path, finished):
    config, out = finished
    out = copy_run(out, tmp_path)
    shutil.rmtree(out / "final")  # as if the run had died after step 4's checkpoint, in the middle of a row
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "epoch": 0, "lo')
    check(run_cli("train", str(config), f"output_dir={out}", "resume=auto", "train.max_steps=6"))
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_a_checkpoint_missing_a_ranks_rng_state_is_refused_and_kept(tmp_path: Path):
    config = write_config(
        tmp_path / "c.yaml", tiny_config(tmp_path, model={"dropout": 0.1}, checkpoint={"every_steps": 2}, launch={"nproc_per_node": 2})
    )
    out = tmp_path / "out"
    check(run_cli("train", str(config)))
    newest = out / "checkpoints" / "step-000000004"
    assert json.loads((newest / "trainer_state.json").read_text())["files"]["random_states_1.pkl"] > 0
    (newest / "random_states_1.pkl").unlink()
    before = disk_snapshot(tmp_path)
    line = one_error_line(run_cli("train", str(config), "resume=auto", "train.max_steps=6"))
    assert f"checkpoint '{newest}' is incomplete: rank 1's RNG state (random_states_1.pkl) is missing" in line
    assert disk_snapshot(tmp_path) == before


@pytest.fixture(scope="module")
def finished_hf(tiny_hf, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Finished 2-step runs of the tiny Llama, each with a checkpoint at its end, whose final/ holds no
    model.safetensors: 'lora' (the adapter and merged/, itself sharded) and 'sharded' (the full model in shards)."""
    runs = {}
    for name, sections in {
        "lora": {"lora": {"r": 2, "alpha": 4, "target_modules": ["q_proj"]}, "export": {"merge_lora": True, "max_shard_size": "100KB"}},
        "sharded": {"export": {"max_shard_size": "100KB"}},
    }.items():
        tmp = tmp_path_factory.mktemp(name)
        config = write_config(tmp / "c.yaml", hf_config(tmp, tiny_hf["llama"], train={"max_steps": 2}, checkpoint={"every_steps": 2}, **sections))
        check(run_cli("train", str(config)))
        runs[name] = config, tmp / "out"
    return runs


@pytest.mark.parametrize("kind", ["lora", "sharded"])
def test_a_finished_lora_or_sharded_run_survives_resume_auto_byte_for_byte(tmp_path: Path, finished_hf, kind):
    config, out = finished_hf[kind]
    out = copy_run(out, tmp_path)
    weights = {"lora": ["adapter_model.safetensors", "merged/model.safetensors.index.json"], "sharded": ["model.safetensors.index.json"]}
    assert all((out / "final" / name).is_file() for name in weights[kind]) and not (out / "final" / "model.safetensors").exists()
    assert len(list((out / "final" / ("merged" if kind == "lora" else "")).glob("model-0000?-of-00006.safetensors"))) == 6  # 820 KB in 100 KB
    before = disk_snapshot(out)
    for _ in range(2):
        proc = check(run_cli("train", str(config), f"output_dir={out}", "resume=auto"))
        assert f"output_dir '{out}' holds this run, finished (" in proc.stdout and "resumed from" not in proc.stdout
        assert disk_snapshot(out) == before
    if kind == "lora":
        assert "finished (final/ (the LoRA adapter, adapter_model.safetensors, and merged/, the merged model)); nothing to do" in proc.stdout
        shutil.rmtree(out / "checkpoints")  # without checkpoints: still this run, finished (not "holds no checkpoint")
        before = disk_snapshot(out)
        assert "holds this run, finished" in check(run_cli("train", str(config), f"output_dir={out}", "resume=auto")).stdout
        assert disk_snapshot(out) == before
    else:  # a shard lost (or not yet written): final/ is incomplete, and the run resumes from its checkpoint
        (out / "final" / "model-00006-of-00006.safetensors").unlink()
        proc = check(run_cli("train", str(config), f"output_dir={out}", "resume=auto"))
        assert f"resumed from {out / 'checkpoints' / 'step-000000002'} at step 2" in proc.stdout
        rewritten = disk_snapshot(out / "final")
        assert rewritten.pop("config.yaml")  # the marker, written last (it names this output_dir and resume=auto)
        assert rewritten == {k.removeprefix("final/"): v for k, v in before.items() if k.startswith("final/") and k != "final/config.yaml"}


def test_overwrite_never_deletes_the_runs_own_inputs(tmp_path: Path, finished_hf):
    """--overwrite with model.pretrained in OUTPUT_DIR/final, or data.path in a folder --overwrite clears: refused in
    one line naming the key and the file, nothing deleted; a file of output_dir that --overwrite keeps may be read."""
    config, out = finished_hf["sharded"]
    out = copy_run(out, tmp_path)
    before = disk_snapshot(tmp_path)
    line = one_error_line(run_cli("train", str(config), f"output_dir={out}", f"model.pretrained={out}/final", "--overwrite"))
    assert line == (
        f"launcher: error: --overwrite would delete this run's own input: model.pretrained '{out}/final' (in {out}/final);"
        " copy it out of output_dir first and point the key at the copy, or set output_dir=NEW_DIR"
    )
    assert disk_snapshot(tmp_path) == before

    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    run = tmp_path / "out"
    (run / "logs").mkdir(parents=True)
    shutil.copy(tmp_path / "docs.jsonl", run / "logs" / "docs.jsonl")
    link = tmp_path / "data-link"
    link.symlink_to(run / "logs")  # a symlink to the folder is the same file
    before = disk_snapshot(tmp_path)
    for path in (run / "logs" / "docs.jsonl", link / "docs.jsonl"):
        line = one_error_line(run_cli("train", str(config), f"data.path={path}", "--overwrite"))
        assert f"--overwrite would delete this run's own input: data.path '{path}' (in {run}/logs);" in line
        assert disk_snapshot(tmp_path) == before
    (run / "mine").mkdir()
    shutil.move(run / "logs" / "docs.jsonl", run / "mine" / "docs.jsonl")  # not a file of the launcher's: kept
    check(run_cli("train", str(config), f"data.path={run}/mine/docs.jsonl", "--overwrite"))
    assert (run / "mine" / "docs.jsonl").read_bytes() == (tmp_path / "docs.jsonl").read_bytes() and not (run / "logs" / "docs.jsonl").exists()


def test_the_debug_summary_names_a_lora_runs_adapter(tmp_path: Path, tiny_hf):
    lora = {"r": 2, "alpha": 4, "target_modules": ["q_proj"]}
    config = write_config(tmp_path / "c.yaml", hf_config(tmp_path, tiny_hf["llama"], lora=lora))
    proc = check(run_cli("train", str(config), "--debug", "--debug-steps", "1"))
    summary = proc.stdout[proc.stdout.index("debug summary") :]
    assert f"outputs: {tmp_path}/out-debug/ (metrics.jsonl, final/ (the LoRA adapter, adapter_model.safetensors));" in summary
    assert (tmp_path / "out-debug" / "final" / "adapter_model.safetensors").is_file()


def test_overwrite_keeps_a_symlinked_checkpoints_folder(tmp_path: Path, finished):
    """checkpoints/ made a link to another disk: --overwrite empties what it points to and keeps the link, so the
    new run's checkpoints go where the user sent them (rmtree refused the link with a traceback)."""
    config, out = finished
    run = copy_run(out, tmp_path)
    scratch = tmp_path / "scratch"
    shutil.move(run / "checkpoints", scratch)
    (run / "checkpoints").symlink_to(scratch, target_is_directory=True)
    (scratch / "someone-else.txt").write_text("gone with the old run")
    check(run_cli("train", str(config), f"output_dir={run}", "--overwrite", "checkpoint.every_steps=4"))
    assert (run / "checkpoints").is_symlink() and sorted(p.name for p in scratch.iterdir()) == ["step-000000004"]
