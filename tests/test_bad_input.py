"""Bad input: one line naming the key or file and the fix, exit code 2, no traceback, nothing on disk changed."""

import json
import subprocess
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, cpu_env, disk_snapshot, run_cli, tiny_config, write_config

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
    # paths: as a shell reads them, and names the file system cannot hold
    "unset variable in a path": (["data.path=$LAUNCHER_NO_SUCH_VARIABLE/docs.jsonl"], "data.path: '$LAUNCHER_NO_SUCH_VARIABLE/docs.jsonl' uses"),
    "output_dir name too long": ([f"output_dir=out/{'o' * 300}"], "output_dir: the name 'oooo"),
    "data.path name too long": ([f"data.path={'d' * 300}.jsonl"], "over the file system's 255; use a shorter name"),
    "output_dir under a file": (["output_dir=README.md/out"], "output_dir: 'README.md/out' lies under 'README.md', which is a file"),
    "cache_dir under a file": (["data.cache_dir=README.md/cache"], "data.cache_dir: 'README.md/cache' lies under 'README.md', which is a file"),
    # settings that cannot take effect in this run
    "field of another format": (["data.format=chat", "data.prompt_field=question"], "data.prompt_field: not read with data.format: chat"),
    "separate documents of chat": (["data.format=chat", "data.separate_documents=true"], "data.separate_documents: not read with data.format: chat"),
    "separate documents unpacked": (["data.pack=false", "data.separate_documents=true"], "with data.pack: false each row holds one document already"),
    "eval without an eval set": (["data.eval_fraction=0", "eval.every_steps=2"], "eval.every_steps: there is no evaluation set"),
    "dump steps without names": (["--dump-grad-steps", "1,2"], "diagnostics.dump_grad_steps: says when to print diagnostics.dump_grad"),
    "shards of the built-in GPT": (["export.max_shard_size=1GB"], "export.max_shard_size: only Hugging Face exports are sharded"),
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

# `launcher plan` arguments that are no time
PLAN_CASES = {
    "step time 0": (["--step-time-s", "0"], "--step-time-s: 0.0 is not a time a step can take"),
    "step time nan": (["--step-time-s", "nan"], "--step-time-s: nan is not a time"),
    "step time negative": (["--step-time-s", "-1"], "--step-time-s: -1.0 is not a time"),
    "step time infinite": (["--step-time-s", "inf"], "--step-time-s: inf is not a time"),
    "time limit nan": (["--time-limit", "nan"], "--time-limit: 'nan' is not a time; use HH:MM:SS"),
    "time limit zero": (["--time-limit", "00:00:00"], "--time-limit: '00:00:00' is no time at all"),
    "time limit bad days": (["--time-limit", "x-01:00:00"], "--time-limit: 'x-01:00:00' is not a time"),
}


def assert_refused(proc, tmp_path: Path, before: dict, expected: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("launcher: error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert disk_snapshot(tmp_path, folders=True) == before


@pytest.mark.parametrize("name", PLAN_CASES)
def test_plan_arguments_that_are_no_time_give_one_line_and_exit_2(tmp_path: Path, name: str):
    arguments, expected = PLAN_CASES[name]
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    before = disk_snapshot(tmp_path, folders=True)
    assert_refused(run_cli("plan", str(config), "--time-limit", "01:00:00", "--step-time-s", "2", *arguments), tmp_path, before, expected)


def test_deepspeed_without_its_package_names_the_extra(tmp_path: Path):
    """A machine without DeepSpeed: a package `deepspeed` whose import fails as a missing one does."""
    (tmp_path / "site" / "deepspeed").mkdir(parents=True)
    (tmp_path / "site" / "deepspeed" / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'deepspeed'\", name='deepspeed')\n")
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, deepspeed=str(REPO / "configs" / "deepspeed" / "zero2.json")))
    before = disk_snapshot(tmp_path, folders=True)
    proc = subprocess.run(
        [PYTHON, "-m", "launcher", "train", str(config)],
        cwd=tmp_path,
        env=cpu_env(PYTHONPATH=f"{tmp_path / 'site'}:{REPO}"),
        capture_output=True,
        text=True,
    )
    assert_refused(proc, tmp_path, before, "deepspeed: DeepSpeed runs need the deepspeed package, not installed here; pip install -e '.[deepspeed]'")


def test_a_cache_variable_under_a_file_is_bad_input(tmp_path: Path):
    """LAUNCHER_CACHE (no config key) under a regular file: bad input (exit 2) naming the variable, not a fault of the disk."""
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    before = disk_snapshot(tmp_path, folders=True)
    proc = subprocess.run(
        [PYTHON, "-m", "launcher", "train", str(config)], cwd=REPO, env=cpu_env(LAUNCHER_CACHE=str(config / "cache")), capture_output=True, text=True
    )
    assert_refused(proc, tmp_path, before, f"LAUNCHER_CACHE: '{config / 'cache'}' lies under '{config}', which is a file")


def test_paths_mean_what_they_mean_in_a_shell(tmp_path: Path, monkeypatch):
    """`~` and `$VAR` in a path are expanded as a shell would, for every path key."""
    from launcher.config import load_config

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("LAUNCHER_TEST_RUNS", str(tmp_path / "runs"))
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    cfg = load_config(config, ["output_dir=$LAUNCHER_TEST_RUNS/a", "data.path=~/docs.jsonl", "data.cache_dir=${LAUNCHER_TEST_RUNS}/cache"])
    assert (cfg.output_dir, cfg.data.path, cfg.data.cache_dir) == (tmp_path / "runs" / "a", tmp_path / "docs.jsonl", tmp_path / "runs" / "cache")


def test_yaml_merge_keys_work(tmp_path: Path):
    """`<<: *anchor` is YAML; top-level `x-` keys hold anchors. An explicit key beside a merge overrides it."""
    from launcher.config import load_config

    text = write_config(tmp_path / "base.yaml", tiny_config(tmp_path)).read_text()
    (tmp_path / "c.yaml").write_text(text + "x-cadence: &cadence {every_steps: 2, keep_last: 1}\ncheckpoint:\n  <<: *cadence\n  keep_last: 3\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.checkpoint.every_steps, cfg.checkpoint.keep_last) == (2, 3)


def test_a_runs_own_config_yaml_loads_back(tmp_path: Path):
    """Every key is written to config.yaml with its value: the values that do not apply to this run (the built-in
    GPT's sizes beside a Hugging Face model, another format's fields) are their defaults and are not refused."""
    from launcher.config import Config, load_config, to_yaml

    for raw in ({"model": {"hf_config": {"model_type": "gpt2"}}}, {"data": {"format": "chat", "eval_fraction": 0}}):
        cfg = Config.model_validate({**raw, "train": {"max_steps": 3}})
        (tmp_path / "config.yaml").write_text(to_yaml(cfg))
        assert load_config(tmp_path / "config.yaml") == cfg


def test_a_huge_run_length_prints_its_progress(tmp_path: Path):
    """train.max_steps=10**16 is a valid (if absurd) bound: the progress line's time left must not overflow."""
    from launcher.formatting import duration_text

    assert duration_text(3.0e17) == "9.51e+09 years" and duration_text(3725) == "1:02:05" and duration_text(float("inf")) == "unknown"


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
