"""Bad input: one line naming the key or file and the fix, exit code 2, no traceback, nothing on disk changed."""

import json
from pathlib import Path

import pytest

from conftest import disk_snapshot, run_cli, tiny_config, write_config

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
    "dump-grad unknown": (
        ["--dump-grad", "blocks.0.qkv.weigth"],
        "diagnostics.dump_grad: no parameter 'blocks.0.qkv.weigth'; closest names: blocks.0.qkv.weight",
    ),
    "dump-grad frozen": (["freeze=[pos_embed.*]", "--dump-grad", "pos_embed.weight"], "'pos_embed.weight' is frozen"),
    "bad nonfinite policy": (["diagnostics.nonfinite=ignore"], "set diagnostics.nonfinite to one of 'stop' or 'skip'"),
    "skip under DeepSpeed": (
        ["deepspeed=configs/deepspeed/zero2.json", "diagnostics.nonfinite=skip"],
        "diagnostics.nonfinite: skip is not available under DeepSpeed",
    ),
    "simulate < 1": (["--simulate-world-size", "0"], "set launch.simulate_world_size to 1 or more"),
    "simulate with processes": (
        ["launch.simulate_world_size=2", "launch.nproc_per_node=2"],
        "launch.simulate_world_size runs one process; set launch.nproc_per_node to 1",
    ),
    "overfit < 1": (["--overfit-batches", "0"], "set train.overfit_batches to 1 or more"),
    "debug steps < 1": (["--debug", "--debug-steps", "0"], "--debug-steps must be 1 or more"),
    "bad override after a flag": (["--debug", "max_steps"], "override 'max_steps' is not of the form dotted.key=value"),
    # numbers that cannot train
    "infinite learning rate": (
        ["train.learning_rate=.inf"],
        "train.learning_rate: input should be a finite number (got inf); set train.learning_rate to a finite number",
    ),
    "nan learning rate": (["train.learning_rate=.nan"], "train.learning_rate"),
    "infinite weight decay": (["train.weight_decay=.inf"], "set train.weight_decay to a finite number"),
    "infinite max_grad_norm": (["train.max_grad_norm=.inf"], "set train.max_grad_norm to a finite number"),
    "nan adam beta": (["train.adam_beta2=.nan"], "train.adam_beta2"),
    "infinite dropout": (["model.dropout=-.inf"], "model.dropout"),
    "nan grad norm type": (["train.grad_norm_type=.nan"], "train.grad_norm_type"),
    "negative seed": (["seed=-1"], "set seed to 0 or more"),
    "seed beyond 32 bits": (["seed=1099511627776"], "set seed to 2147483647 or less"),
    "fractional seed": (["seed=1.5"], "seed: input should be a valid integer"),
    "boolean for a number": (["train.max_steps=true"], "train.max_steps: true is not a number; give a number"),
    "negative max_steps": (["train.max_steps=-3"], "set train.max_steps to 0 or more"),
    "zero epochs": (["train.epochs=0"], "set train.epochs to 1 or more"),
    "zero log interval": (["train.log_every=0"], "set train.log_every to 1 or more"),
    "negative warmup": (["train.warmup_steps=-1"], "set train.warmup_steps to 0 or more"),
    "unknown schedule": (["train.lr_schedule=step"], "set train.lr_schedule to one of 'cosine', 'linear' or 'constant'"),
    "seq_len 1": (["data.seq_len=1"], "set data.seq_len to 2 or more"),
    "eval fraction 1": (["data.eval_fraction=1"], "set data.eval_fraction to less than 1"),
    "empty text field": (["data.text_field="], "data.text_field"),
    "unsupported data suffix": (["data.path=README.md"], "has an unsupported suffix"),
    "heads do not divide width": (["model.n_head=3"], "model.d_model (32) must be a multiple of model.n_head (3)"),
    "zero checkpoint interval": (["checkpoint.every_steps=0"], "set checkpoint.every_steps to 1 or more"),
    "zero keep_last": (["checkpoint.keep_last=0"], "set checkpoint.keep_last to 1 or more"),
    "zero processes": (["launch.nproc_per_node=0"], "launch.nproc_per_node"),
    "dump step 0": (["diagnostics.dump_grad_steps=[0]"], "diagnostics.dump_grad_steps.0"),
    "missing deepspeed json": (["deepspeed=no/such.json"], "deepspeed: file 'no/such.json' not found"),
    "unknown resume_allow_changes key": (["resume_allow_changes=[train.learning_rat]"], "resume_allow_changes: unknown key(s) train.learning_rat"),
    "resume from nowhere": (["resume=/no/such/checkpoint"], "resume: checkpoint '/no/such/checkpoint' does not exist"),
    "output_dir is a file": (["output_dir=README.md"], "output_dir: 'README.md' is a file"),
    "override into a value": (["seed.x=1"], "override 'seed.x=1': 'seed' is not a section"),
    "fsdp and deepspeed": (["fsdp={}", "deepspeed=configs/deepspeed/zero2.json"], "fsdp and deepspeed both choose the backend; keep one of them"),
    "fsdp not a mapping": (["fsdp=true"], "fsdp: input should be a valid dictionary"),
    "fsdp unknown key": (["fsdp={reshard: false}"], "unknown key 'fsdp.reshard'; did you mean 'fsdp.reshard_after_forward'?"),
    "fsdp with fp16": (["fsdp={}", "train.mixed_precision=fp16"], "train.mixed_precision: fp16 needs a sharded loss scaler"),
    "fsdp with compile": (["fsdp={}", "train.compile=true"], "train.compile: not available with fsdp"),
}

# DeepSpeed JSON files with malformed values (written into the test's folder)
DEEPSPEED_CASES = {
    "stage is a word": ({"zero_optimization": {"stage": "two"}}, "zero_optimization.stage: input should be 0, 1, 2, 3"),
    "stage out of range": ({"zero_optimization": {"stage": 7}}, "zero_optimization.stage"),
    "zero section is a list": ({"zero_optimization": []}, "zero_optimization must be a JSON object (got [])"),
    "fp16 is a boolean": ({"fp16": True}, "fp16 must be a JSON object (got true)"),
    "offload to the gpu": (
        {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "gpu"}}},
        "zero_optimization.offload_optimizer.device: input should be 'none', 'cpu' or 'nvme'",
    ),
    "offload is a string": (
        {"zero_optimization": {"stage": 2, "offload_optimizer": "cpu"}},
        "zero_optimization.offload_optimizer must be a JSON object",
    ),
    "bucket size is a word": (
        {"zero_optimization": {"stage": 2, "reduce_bucket_size": "big"}},
        "zero_optimization.reduce_bucket_size: input should be a valid integer",
    ),
    "flag is not a boolean": (
        {"zero_optimization": {"stage": 2, "overlap_comm": "maybe"}},
        "zero_optimization.overlap_comm: input should be a valid boolean",
    ),
    "micro-batch is a word": ({"train_micro_batch_size_per_gpu": "eight"}, 'train_micro_batch_size_per_gpu is "eight"'),
}

# config files that do not parse into a config
YAML_CASES = {
    "duplicated key": (
        "train:\n  max_steps: 3\n  learning_rate: 0.1\n  max_steps: 5\n",
        "key 'max_steps' is given twice (lines 2 and 4); keep one of them",
    ),
    "duplicated section": ("train:\n  max_steps: 3\ntrain:\n  max_steps: 5\n", "key 'train' is given twice (lines 1 and 3)"),
    "top level is a list": ("- train\n- model\n", "the top level must be a mapping of keys, got list"),
    "tab indentation": ("train:\n\tmax_steps: 3\n", "not valid YAML at line 2"),
}


def assert_refused(proc, tmp_path: Path, before: dict, expected: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("launcher: error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert disk_snapshot(tmp_path, folders=True) == before


def test_the_table_holds_at_least_40_bad_inputs():
    assert len(CASES) + len(DEEPSPEED_CASES) + len(YAML_CASES) >= 40


@pytest.mark.parametrize("name", DEEPSPEED_CASES)
def test_malformed_deepspeed_values_give_one_line_and_exit_2(tmp_path: Path, name: str):
    pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra: scripts/setup deepspeed,dev")
    content, expected = DEEPSPEED_CASES[name]
    (tmp_path / "ds.json").write_text(json.dumps(content))
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, deepspeed=str(tmp_path / "ds.json")))
    before = disk_snapshot(tmp_path, folders=True)
    assert_refused(run_cli("train", str(config)), tmp_path, before, f"{tmp_path / 'ds.json'}: {expected}")


@pytest.mark.parametrize("name", YAML_CASES)
def test_config_files_that_do_not_parse_give_one_line_and_exit_2(tmp_path: Path, name: str):
    text, expected = YAML_CASES[name]
    (tmp_path / "c.yaml").write_text(text)
    before = disk_snapshot(tmp_path, folders=True)
    assert_refused(run_cli("train", str(tmp_path / "c.yaml")), tmp_path, before, f"{tmp_path / 'c.yaml'}: {expected}")


@pytest.mark.parametrize("name", CASES)
def test_bad_input_gives_one_line_and_exit_2(tmp_path: Path, name: str):
    overrides, expected = CASES[name]
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    before = disk_snapshot(tmp_path, folders=True)
    assert_refused(run_cli("train", str(config), *overrides), tmp_path, before, expected)


def test_unparsable_yaml_names_the_file_and_line(tmp_path: Path):
    config = tmp_path / "broken.yaml"
    config.write_text("train:\n  max_steps: 3\n   micro_batch_size: [1\n")
    proc = run_cli("train", str(config))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and f"{config}: not valid YAML at line" in proc.stderr


def test_missing_config_file(tmp_path: Path):
    proc = run_cli("train", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "nope.yaml' not found" in proc.stderr


@pytest.mark.parametrize(
    "folder, flags, expected",
    [
        ("out", [], "--overwrite"),
        ("out-debug", ["--debug"], "holds something other than a debug run"),  # debug mode replaces only a debug run
    ],
)
def test_existing_output_dir_is_refused_and_kept(tmp_path: Path, folder: str, flags: list[str], expected: str):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    (tmp_path / folder).mkdir()
    (tmp_path / folder / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    before = disk_snapshot(tmp_path, folders=True)
    proc = run_cli("train", str(config), *flags)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "output_dir: " in proc.stderr and expected in proc.stderr
    assert disk_snapshot(tmp_path, folders=True) == before


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


@pytest.mark.parametrize("nproc", [1, 2])
def test_every_problem_of_a_run_is_reported_at_once_before_any_process_starts(tmp_path: Path, nproc: int):
    """Problems that different checks find (the hardware, the freeze patterns, a gradient name, output_dir, the
    documents) come in one report from one validation pass: one line each, exit 2, nothing on disk changed."""
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "one document"}\n{"text": "another"}\n{"text": \n')
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("not a run")
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, launch={"nproc_per_node": nproc}))
    before = disk_snapshot(tmp_path, folders=True)
    proc = run_cli(
        "train", str(config), f"data.path={data}", "train.mixed_precision=fp16", "freeze=[blocks.7.*]", "--dump-grad", "blocks.0.qkv.weigth"
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    expected = [
        "train.mixed_precision: fp16 needs a CUDA GPU",
        "freeze: 'blocks.7.*' matches no parameter",
        "diagnostics.dump_grad: no parameter 'blocks.0.qkv.weigth'",
        "output_dir: ",
        "line 3 is not valid JSON",
    ]
    assert len(lines) == len(expected) and all(line.startswith("launcher: error: ") for line in lines), lines
    for text in expected:
        assert sum(text in line for line in lines) == 1, (text, lines)
    assert "Traceback" not in proc.stderr and proc.stdout == ""  # refused before anything started
    assert disk_snapshot(tmp_path, folders=True) == before
