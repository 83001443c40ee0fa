"""Bad input: one line naming the key or file and the fix, exit code 2, no traceback, nothing on disk changed."""

import hashlib
from pathlib import Path

import pytest

from conftest import run_cli, tiny_config, write_config


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


CASES = {
    # name: (overrides, expected text in the one line)
    "unknown key": (["train.learning_rat=0.1"], "unknown key 'train.learning_rat'; did you mean 'train.learning_rate'?"),
    "unknown section": (["trian.max_steps=3"], "unknown key 'trian'; did you mean 'train'?"),
    "wrong type": (["train.max_steps=many"], "train.max_steps: input should be a valid integer"),
    "accumulation < 1": (["train.gradient_accumulation_steps=0"], "set train.gradient_accumulation_steps to 1 or more"),
    "micro-batch < 1": (["train.micro_batch_size=0"], "set train.micro_batch_size to 1 or more"),
    "max_grad_norm = 0": (["train.max_grad_norm=0"], "set train.max_grad_norm to more than 0"),
    "max_grad_norm < 0": (["train.max_grad_norm=-1.5"], "train.max_grad_norm"),
    "bad precision": (["train.mixed_precision=fp8"], "set train.mixed_precision to one of 'no', 'fp16' or 'bf16'"),
    "missing data file": (["data.path=no/such/file.jsonl"], "data.path: file 'no/such/file.jsonl' not found"),
    "freeze matches nothing": (["freeze=[blocks.7.*]"], "freeze: 'blocks.7.*' matches no parameter; closest names:"),
    "freeze everything": (["freeze=['*']"], "freeze: the patterns freeze all"),
    "bad override": (["max_steps"], "override 'max_steps' is not of the form dotted.key=value"),
    "missing text field": (["data.text_field=body"], "data.text_field: "),
    "dump-grad unknown": (["--dump-grad", "blocks.0.qkv.weigth"],
                          "diagnostics.dump_grad: no parameter 'blocks.0.qkv.weigth'; closest names: blocks.0.qkv.weight"),
    "dump-grad frozen": (["freeze=[pos_embed.*]", "--dump-grad", "pos_embed.weight"], "'pos_embed.weight' is frozen"),
    "bad nonfinite policy": (["diagnostics.nonfinite=ignore"], "set diagnostics.nonfinite to one of 'stop' or 'skip'"),
    "skip under DeepSpeed": (["deepspeed=configs/deepspeed/zero2.json", "diagnostics.nonfinite=skip"],
                             "diagnostics.nonfinite: skip is not available under DeepSpeed"),
    "simulate < 1": (["--simulate-world-size", "0"], "set launch.simulate_world_size to 1 or more"),
    "simulate with processes": (["launch.simulate_world_size=2", "launch.nproc_per_node=2"],
                                "launch.simulate_world_size runs one process; set launch.nproc_per_node to 1"),
    "overfit < 1": (["--overfit-batches", "0"], "set train.overfit_batches to 1 or more"),
    "debug steps < 1": (["--debug", "--debug-steps", "0"], "--debug-steps must be 1 or more"),
    "bad override after a flag": (["--debug", "max_steps"], "override 'max_steps' is not of the form dotted.key=value"),
}


@pytest.mark.parametrize("name", CASES)
def test_bad_input_gives_one_line_and_exit_2(tmp_path: Path, name: str):
    overrides, expected = CASES[name]
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    before = snapshot(tmp_path)
    proc = run_cli("train", str(config), *overrides)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("launcher: error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert snapshot(tmp_path) == before


def test_unparsable_yaml_names_the_file_and_line(tmp_path: Path):
    config = tmp_path / "broken.yaml"
    config.write_text("train:\n  max_steps: 3\n   micro_batch_size: [1\n")
    proc = run_cli("train", str(config))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and f"{config}: not valid YAML at line" in proc.stderr


def test_missing_config_file(tmp_path: Path):
    proc = run_cli("train", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "nope.yaml' not found" in proc.stderr


@pytest.mark.parametrize("folder, flags, expected", [
    ("out", [], "--overwrite"),
    ("out-debug", ["--debug"], "holds something other than a debug run"),  # debug mode replaces only a debug run
])
def test_existing_output_dir_is_refused_and_kept(tmp_path: Path, folder: str, flags: list[str], expected: str):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    (tmp_path / folder).mkdir()
    (tmp_path / folder / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    before = snapshot(tmp_path)
    proc = run_cli("train", str(config), *flags)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "output_dir: " in proc.stderr and expected in proc.stderr
    assert snapshot(tmp_path) == before


def test_every_problem_is_reported_at_once(tmp_path: Path):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    proc = run_cli("train", str(config), "train.micro_batch_size=0", "train.max_grad_norm=0", "eval.every_steps=-1")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("launcher: error: ") for line in lines)


def test_bad_input_with_several_processes_fails_before_starting_them(tmp_path: Path):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, launch={"nproc_per_node": 2}))
    proc = run_cli("train", str(config), "freeze=[nothing.here]")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "freeze: 'nothing.here'" in proc.stderr
