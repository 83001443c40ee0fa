"""Shared test helpers: small corpora, configs, and launching real multi-process runs on CPU (gloo)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


EXIT_PROBE = REPO / "tests" / "exit_probe"  # its sitecustomize: a process in the interpreter's teardown with gloo threads
EXIT_PROBE_MARK = "exit probe:"


def cpu_env(**extra: str) -> dict[str, str]:
    """The environment of a process the tests start: CPU ranks, and the exit probe first on the PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    path = os.pathsep.join([str(EXIT_PROBE), *([extra.pop("PYTHONPATH")] if "PYTHONPATH" in extra else [])])
    env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1", PYTHONPATH=path, **extra)
    return env


def gpu_env(**extra: str) -> dict[str, str]:
    # tests/ on the PYTHONPATH: tests/factories.py for model.factory
    env = {k: v for k, v in cpu_env(PYTHONPATH=str(REPO / "tests")).items() if k not in ("ACCELERATE_USE_CPU", "CUDA_VISIBLE_DEVICES")}
    env.update(**extra)
    return env


def torchrun(nproc: int, *target: str) -> list[str]:
    """The command that starts `target` (a script, or -m MODULE, with its arguments) as `nproc` processes under torchrun
    on a free local port."""
    return [
        PYTHON,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        *target,
    ]


def run_cli(
    *args: str, nproc: int = 1, timeout: float = 300, launcher: str | None = None, gpu: bool = False, accelerate_config: Path | None = None
) -> subprocess.CompletedProcess:
    """`launcher <args>` as a plain process (nproc 1, no launcher named), or `nproc` processes under torchrun /
    accelerate launch on a free port: gloo on CPU, or on the GPU(s) with gpu=True. `accelerate_config`: accelerate
    launch with that config file (it chooses the distributed type) instead of --multi_gpu."""
    launcher = launcher or ("accelerate" if accelerate_config else "plain" if nproc == 1 else "torchrun")
    if launcher == "plain":
        cmd = [PYTHON, "-m", "launcher", *args]
    elif launcher == "torchrun":
        cmd = torchrun(nproc, "-m", "launcher", *args)
    else:
        how = ["--config_file", str(accelerate_config)] if accelerate_config else ["--multi_gpu"]
        cmd = [PYTHON, "-m", "accelerate.commands.launch", *how, "--num_processes", str(nproc), "--main_process_port", str(free_port())]
        cmd += ["-m", "launcher", *args]
    return no_teardown_with_groups(
        subprocess.run(cmd, cwd=REPO, env=gpu_env() if gpu else cpu_env(), capture_output=True, text=True, timeout=timeout)
    )


def run_worker(script: str, *args: str, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """A test worker from tests/workers under torchrun with `nproc` gloo processes."""
    cmd = torchrun(nproc, str(REPO / "tests" / "workers" / script), *args)
    return no_teardown_with_groups(subprocess.run(cmd, cwd=REPO, env=cpu_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=timeout))


def submit_job(
    cluster,
    tmp_path: Path,
    config: Path,
    out: Path,
    *overrides: str,
    script: str = "train.sbatch",
    nodes: int = 1,
    sbatch_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> int:
    """sbatch one of the real slurm/ scripts on a test cluster, in CPU mode with 2 gloo processes per node;
    its log goes to tmp_path/slurm-JOBID.out. `env`: more environment for the job (tests/ is on its PYTHONPATH)."""
    return cluster.sbatch(
        f"--nodes={nodes}",
        f"--output={tmp_path}/slurm-%j.out",
        f"--chdir={REPO}",
        *sbatch_args,
        str(REPO / "slurm" / script),
        str(config),
        f"output_dir={out}",
        *overrides,
        cwd=tmp_path,
        env=cpu_env(PYTHON=PYTHON, NPROC_PER_NODE="2", PYTHONPATH=str(REPO / "tests"), **(env or {})),
    )


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return no_teardown_with_groups(proc)


def no_teardown_with_groups(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Whatever its exit code: no process of the run went into the interpreter's teardown with gloo threads running
    (the exit probe's lines), where a group freed late can abort a process after a run that succeeded."""
    late = [line for line in (proc.stderr or "").splitlines() if line.startswith(EXIT_PROBE_MARK)]
    assert not late, "\n".join(late)
    return proc


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The one line of a run refused as bad input (exit 2, no traceback)."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launcher: error: "), proc.stderr[-3000:]
    return lines[0]


LIBRARY_NOISE = re.compile(r"\b(Future|User|Deprecation|Runtime)Warning\b|\[WARNING\]|^WARNING|^\[transformers\]|Removed shared tensor")


def library_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """The lines of a run's console (stdout and stderr) that a library printed: its warnings belong in
    output_dir/logs/rank-N.log, not on the console."""
    return [line for line in (proc.stdout + proc.stderr).splitlines() if LIBRARY_NOISE.search(line)]


def write_documents(path: Path, n_docs: int, seed: int = 0, min_chars: int = 5, max_chars: int = 120) -> Path:
    """A JSON-lines corpus of `n_docs` documents of varied lengths (deterministic)."""
    rng = torch.Generator().manual_seed(seed)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jumbled boxes".split()
    with path.open("w") as f:
        for i in range(n_docs):
            n_chars = int(torch.randint(min_chars, max_chars + 1, (1,), generator=rng))
            text, k = "", i
            while len(text) < n_chars:
                text += words[(k * 7 + len(text)) % len(words)] + " "
                k += 1
            f.write(json.dumps({"text": text[:n_chars]}) + "\n")
    return path


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def tiny_config(tmp_path: Path, **sections) -> dict:
    """A config for a model small enough that a multi-rank test takes seconds."""
    config = {
        "seed": 1,
        "output_dir": str(tmp_path / "out"),
        "model": {"n_layer": 2, "n_head": 2, "d_model": 32},
        "data": {"path": str(write_documents(tmp_path / "docs.jsonl", 40)), "seq_len": 32, "pack": False, "eval_fraction": 0.1},
        "train": {"micro_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 4, "learning_rate": 1e-2, "warmup_steps": 1, "log_every": 1},
        "eval": {"at_start": False},
    }
    for name, values in sections.items():
        if name == "model" and {"factory", "pretrained", "hf_config"} & set(values):
            config["model"] = values  # the built-in GPT's sizes are refused beside another model
        elif isinstance(values, dict):
            config.setdefault(name, {}).update(values)
        else:
            config[name] = values
    return config


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(output_dir) / "final" / "model.safetensors"))


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def disk_snapshot(root: Path, folders: bool = False) -> dict[str, str]:
    """Each file below `root` (path relative to it) with its SHA-256, and with folders=True each folder as "dir": two
    equal snapshots mean nothing there was written, deleted or (with folders) created."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
        if folders or p.is_file()
    }


def wait_for_rows(output_dir: Path, n: int, running: Callable[[], bool], timeout_s: float = 120, poll_s: float = 0.05) -> None:
    """Polls output_dir/metrics.jsonl until it holds `n` training rows; fails once `running()` is false or after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if len([r for r in metrics(output_dir) if "loss" in r]) >= n:
                return
        except (OSError, ValueError):  # no file yet, or a row half written
            pass
        assert running(), f"the run ended before {output_dir / 'metrics.jsonl'} held {n} training rows"
        assert time.monotonic() < deadline, f"{output_dir / 'metrics.jsonl'} held fewer than {n} training rows after {timeout_s:g} s"
        time.sleep(poll_s)


def train_until_rows(
    config: Path, output_dir: Path, n: int, *overrides: str, timeout_s: float = 120, new_session: bool = False, merge_stderr: bool = False
) -> subprocess.Popen:
    """`launcher train config overrides` started on CPU with its output piped, returned once output_dir has `n` training
    rows (for the test to signal); new_session: it leads its own process group, as a command typed in a terminal."""
    proc = subprocess.Popen(
        [PYTHON, "-m", "launcher", "train", str(config), *overrides],
        cwd=REPO,
        env=cpu_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
        text=True,
        start_new_session=new_session,
    )
    try:
        wait_for_rows(output_dir, n, lambda: proc.poll() is None, timeout_s)
    except AssertionError as error:
        if proc.poll() is None and new_session:  # timed out: end it and its workers, so that its output can be read
            os.killpg(proc.pid, signal.SIGKILL)
        elif proc.poll() is None:
            proc.kill()
        stdout, stderr = proc.communicate()
        raise AssertionError(f"{error}\nexit {proc.returncode}\nstdout:\n{stdout[-3000:]}\nstderr:\n{(stderr or '')[-6000:]}") from None
    return proc


def reference_training(cfg, windows: list, max_grad_norm: float, inspect_gradients: Callable | None = None) -> torch.nn.Module:
    """The launcher's training written out in plain PyTorch from the same initial weights: per window, one mean loss over
    all its target tokens (token-weighted, whatever the micro-batches), global-norm clipping at max_grad_norm, AdamW and
    the LR schedule; `inspect_gradients(step, model)` (step 1-based) sees each step's gradients before the clip."""
    import torch.nn.functional as F

    from launcher.bare_model import build_bare_model
    from launcher.data import IGNORE_INDEX
    from launcher.optim import build_lr_schedule, build_optimizer

    model, _ = build_bare_model(cfg)
    optimizer = build_optimizer(model, cfg.train)
    schedule = build_lr_schedule(optimizer, cfg.train, len(windows))
    for step, window in enumerate(windows, start=1):
        inputs = torch.cat([b.input_ids for b in window.micro_batches])
        labels = torch.cat([b.labels for b in window.micro_batches])
        F.cross_entropy(model(inputs).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX).backward()  # mean over all targets
        if inspect_gradients is not None:
            inspect_gradients(step, model)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    return model


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each session tokenizes into its own cache, so tests never read a stale one."""
    cache = tmp_path_factory.getbasetemp() / "cache"
    monkeypatch.setenv("LAUNCHER_CACHE", str(cache))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache / "datasets"))


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> dict[str, Path]:
    """Tiny Hugging Face model folders made locally (`launcher make-tiny-model`), once per session: 'llama' (BOS
    added, a pad token, untied embeddings) and 'gpt2' (no BOS, no pad token, tied embeddings), bf16 weights."""
    pytest.importorskip("transformers", reason="Hugging Face models need the hf extra: scripts/setup hf,dev")
    from launcher.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("hf-models")
    return {arch: make_tiny_model(root / f"tiny-{arch}", arch) for arch in ("llama", "gpt2")}


def hf_config(tmp_path: Path, model_dir: Path, **sections) -> dict:
    """tiny_config for a Hugging Face model: its own tokenizer, padded variable-length documents."""
    config = tiny_config(tmp_path, **sections)
    config["model"] = {"pretrained": str(model_dir), **sections.get("model", {})}
    return config


def reset_accelerate() -> None:
    """In-process runs share Accelerate's singleton state; a new Run in the same process needs it reset."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


# scripts/test runs the suite on 2 pytest-xdist workers, a test module per worker at a time (the scheduler below), so
# that module fixtures (a shared DDP reference, a SLURM cluster) are made once; the two SLURM modules are one unit, so
# that one cluster runs at a time. The longest units start first (by the durations of a serial run), so that the
# workers end together. (xdist's own --dist loadgroup does not group under pytest 9: it renames a test id pytest no
# longer reads.)
UNIT_OF_MODULE = {"test_slurm": "slurm", "test_multinode": "slurm"}
LONGEST_FIRST = [
    "slurm",
    "test_fsdp",
    "test_deepspeed",
    "test_hf_models",
    "test_hang",
    "test_trackers",
    "test_memory_plan",
    "test_mixtures",
    "test_chat",
    "test_tokens",
    "test_resume_contract",
    "test_resume",
    "test_bad_input",
    "test_faults",
    "test_diagnostics",
    "test_data_sources",
    "test_checkpoint_crash",
    "test_lock_race",
    "test_checkpoint_checksums",
    "test_ddp",
]
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # two workers share the cores: one thread each, as every launched process has (cpu_env)


def unit_of(nodeid: str) -> str:
    module = Path(nodeid.split("::", 1)[0]).stem
    return UNIT_OF_MODULE.get(module, module)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ModuleUnits(LoadScopeScheduling):
        """xdist's per-module scheduling, with the SLURM modules one unit, in collection order (longest first)."""

        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

    config.option.loadscopereorder = False  # keep the collection order: longest first
    return ModuleUnits(config, log)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(unit_of(item.nodeid), len(rank)))  # stable: the order inside a module is kept
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: fp16 loss scaling and bf16/compile on CUDA are GPU-only paths; run on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def chat_tokenizers(tiny_hf, tmp_path_factory) -> dict[str, Path]:
    """Copies of the tiny tokenizers with a chat template and its special tokens: 'chatml' (the Llama-style tokenizer,
    ChatML turns) and 'llama3' (the GPT-2-style tokenizer, Llama-3 headers and <|eot_id|>)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("chat-tokenizers")
    folders = {}
    for name, arch, template, specials in (
        ("chatml", "llama", CHATML_TEMPLATE, ["<|im_start|>", "<|im_end|>"]),
        ("llama3", "gpt2", LLAMA3_TEMPLATE, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    ):
        tokenizer = AutoTokenizer.from_pretrained(tiny_hf[arch])
        tokenizer.add_special_tokens({"additional_special_tokens": specials})
        tokenizer.chat_template = template
        tokenizer.save_pretrained(root / name)
        folders[name] = root / name
    return folders
