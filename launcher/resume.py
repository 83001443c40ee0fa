"""The resume contract: what a run starts from, decided before anything is built or written.

- A run never deletes or overwrites files it did not write itself or in the run it resumes. A non-empty
  output_dir is refused unless there is a checkpoint of this launcher to resume from, or --overwrite.
- `--overwrite` replaces the run in output_dir only when nothing is resumed from it: with `resume: auto`
  it applies when output_dir holds no checkpoint; a resumed run deletes nothing. It never deletes the run's own
  inputs (a model, tokenizer, data, DeepSpeed JSON, ... inside what it would remove): refused.
- A finished run (final/ written with this config) is reported as finished and left as it is.
- Resuming compares the config with the checkpoint's: cadences (logging, eval, checkpoints), diagnostics,
  the launch, the step bounds and the split of the global batch may change; any other difference (data,
  model, optimizer and schedule values, seed, ...) is refused in one line listing each, unless
  `resume_allow_changes` names it: then the new value takes effect and the run header says so.
- The data is part of the config: the checkpoint records the identity of the files of data.path,
  data.eval_path and each data.sources path (launcher.data.identity: size and content) and the number of training samples; other
  bytes there, or another number of samples, are refused like a changed data.path.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from launcher.checkpoints import TrainerState, checkpoint_root, complete_checkpoints, resume_path, verify_checkpoint
from launcher.config import Config, flatten_keys, free_on_resume_keys, to_yaml
from launcher.data.identity import describe
from launcher.data.sources import data_identity, data_path  # reads a few blocks of each file (identity.py)
from launcher.errors import UsageError
from launcher.final import finished_config
from launcher.lock import check_not_held
from launcher.outputs import check_output_dir, cleared_by_overwrite, holds_files

FREE_ON_RESUME_KEYS = free_on_resume_keys()  # launcher.config marks them on their fields
BOUNDS = ("train.max_steps", "train.epochs")
PATH_KEYS = ("data.path", "deepspeed")


@dataclass
class StartingPoint:
    checkpoint: Path | None = None  # the checkpoint to resume from
    state: TrainerState | None = None
    clear: bool = False  # delete the previous run's files first (--overwrite, nothing resumed from them)
    finished: bool = False  # output_dir holds this run, finished: nothing to do
    changes: list[str] = field(default_factory=list)  # what differs from the checkpoint's config, for the run header
    allowed: list[str] = field(default_factory=list)  # the keys of those resume_allow_changes allowed
    notes: list[str] = field(default_factory=list)  # what the run header says about how it starts


@dataclass
class Difference:
    key: str
    old: object
    new: object

    def __str__(self) -> str:
        return f"{self.key} {self.old!r} -> {self.new!r}"


@dataclass
class DataChange(Difference):
    """The files of a data key hold other bytes than the checkpoint was trained on (old, new: their identities)."""

    path: str = ""

    def __str__(self) -> str:

        return f"{self.key} '{self.path}' holds other data than the checkpoint was trained on ({describe(self.old)} -> {describe(self.new)})"


def decide_start(cfg: Config, overwrite: bool, check_lock: bool, verify_contents: bool = False) -> StartingPoint:
    """Where the run starts: fresh, from a verified checkpoint, or not at all (finished). UsageError when it would
    destroy work or silently train something else than the checkpoint's run. `check_lock`: refuse an output_dir
    a live run holds (in one process; ranks of a launched run leave it to the main process's lock).
    `verify_contents`: check the checkpoint's CRC-32s too (it reads it whole: once per run, by the pre-flight)."""
    out = cfg.output_dir
    check_output_dir(out, overwrite=True)  # a file where a folder should be
    if check_lock:
        check_not_held(out)
    if cfg.resume is None:
        check_output_dir(out, overwrite)
        return StartingPoint(clear=clears(cfg, overwrite))
    if cfg.resume == "auto":
        finished = finished_run(cfg)
        if finished is not None:
            return finished
        checkpoint = resume_path("auto", out)
        if checkpoint is None:  # nothing of this launcher to continue: like any other folder
            if finished_config(out) is not None and not overwrite:
                raise UsageError(
                    f"output_dir: '{out}' holds a finished run without checkpoints, so resume=auto has nothing to continue;"
                    f" set output_dir=NEW_DIR, or pass --overwrite to train it again from scratch"
                )
            if holds_files(out) and not overwrite:
                raise UsageError(
                    f"output_dir: '{out}' is not empty and holds no checkpoint to resume (resume=auto);"
                    f" pass --overwrite to replace its run, or set output_dir=NEW_DIR"
                )
            return StartingPoint(clear=clears(cfg, overwrite))
    else:
        checkpoint = resume_path(cfg.resume, out)
    start = StartingPoint(checkpoint, verify_checkpoint(checkpoint, contents=verify_contents))
    if out.resolve() not in checkpoint.resolve().parents:  # another run's checkpoint: output_dir is new, or replaced
        check_output_dir(out, overwrite)
        start.clear = clears(cfg, overwrite, checkpoint)
    elif overwrite:  # never: it would delete the checkpoint being resumed, or the run it continues
        start.notes.append("--overwrite ignored: this run continues output_dir's own run, and deletes nothing of it")
    start.changes, start.allowed = check_config(cfg, checkpoint, start.state)
    newer = [p.name for p in complete_checkpoints(out) if p.name > checkpoint.name] if not start.clear else []
    if newer:
        start.notes.append(
            f"a new branch from {checkpoint.name}: the newer checkpoints ({', '.join(newer)}) move to"
            f" {checkpoint_root(out)}/branch-N/, kept and no longer resumed by resume=auto"
        )
    return start


def clears(cfg: Config, overwrite: bool, checkpoint: Path | None = None) -> bool:
    """Whether the run starts by deleting the previous run's files (--overwrite, nothing resumed from them). UsageError
    when that would delete one of this run's own inputs."""
    if not (overwrite and holds_files(cfg.output_dir)):
        return False
    inputs = [(key, path, cleared_by_overwrite(cfg.output_dir, path)) for key, path in input_paths(cfg, checkpoint)]
    doomed = [f"{key} '{path}' (in {cfg.output_dir}/{name})" for key, path, name in inputs if name is not None]
    if doomed:
        raise UsageError(
            f"--overwrite would delete this run's own input: {'; '.join(doomed)}; copy it out of output_dir first"
            f" and point the key at the copy, or set output_dir=NEW_DIR"
        )
    return True


def input_paths(cfg: Config, checkpoint: Path | None) -> list[tuple[str, Path]]:
    """The local files and folders a run reads, each with the key naming it (a glob: each file it matches)."""
    named = [
        ("model.pretrained", cfg.model.pretrained),
        ("model.hf_config", cfg.model.hf_config if isinstance(cfg.model.hf_config, Path) else None),
        ("tokenizer", cfg.tokenizer),
        ("data.path", cfg.data.path),
        ("data.eval_path", cfg.data.eval_path),
        ("data.name", cfg.data.name),  # a local folder of data files, or a hub name (then no path here)
        ("data.chat_template", cfg.data.chat_template if cfg.data.chat_template != "default" else None),
        ("deepspeed", cfg.deepspeed),
        ("resume", checkpoint),
        *((f"data.sources.{i}.path", source.path) for i, source in enumerate(cfg.data.sources or ())),
    ]
    if cfg.model.factory is not None:  # the module's file, where the factory's import would find it
        module = cfg.model.factory.split(":")[0].replace(".", "/")
        folders = [d for d in (cfg.config_dir, Path.cwd()) if d is not None]
        named += [("model.factory", d / f"{module}{suffix}") for d in folders for suffix in (".py", "")]
    paths = []
    for key, value in named:
        if value is None:
            continue
        if (key in ("data.path", "data.eval_path") or key.startswith("data.sources.")) and any(c in str(value) for c in "*?["):
            paths += [(key, Path(match)) for match in sorted(glob.glob(str(value), recursive=True))]
        elif Path(value).exists():
            paths.append((key, Path(value)))
    return paths


def finished_run(cfg: Config) -> StartingPoint | None:
    """With resume=auto: output_dir holds this run, finished (final/ written, with the same step bounds and nothing
    that would be refused as a change)."""
    old = finished_config(cfg.output_dir)
    if old is None:
        return None
    differences = config_differences(old, cfg)
    if any(d.key in BOUNDS for d in differences) or refused(differences, cfg.resume_allow_changes):
        return None
    return StartingPoint(finished=True)


def check_config(cfg: Config, checkpoint: Path, state: TrainerState | None = None) -> tuple[list[str], list[str]]:
    """Compare the run's config and data with the checkpoint's; UsageError listing what would change the training
    (unless allowed); the changes, for the run header, and the keys of those allowed."""
    try:
        old = yaml.safe_load((checkpoint / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return [], []  # a checkpoint without its config: nothing to compare against
    differences = config_differences(old, cfg)
    differences += [d for d in data_differences(cfg, state) if d.key not in {c.key for c in differences}]
    blocked = refused(differences, cfg.resume_allow_changes)
    if blocked:
        keys = ",".join(d.key for d in blocked)
        data, config = any(isinstance(d, DataChange) for d in blocked), not all(isinstance(d, DataChange) for d in blocked)
        what = " and ".join(w for w, found in (("the config", config), ("the data", data)) if found)
        restore = " and ".join(w for w, found in (("the checkpoint's values", config), ("the data", data)) if found)
        raise UsageError(
            f"resume: {what} differs from checkpoint '{checkpoint}' in what it trains: "
            + "; ".join(str(d) for d in blocked)
            + f"; restore {restore}, or allow the change with resume_allow_changes=[{keys}]"
            + (", or set output_dir=NEW_DIR for a new run" if data else "")
        )
    quiet = ("output_dir", "resume", "resume_allow_changes")
    changes = [
        str(d) + (" (resume_allow_changes)" if not _matches(d.key, FREE_ON_RESUME_KEYS) else "") for d in differences if not _matches(d.key, quiet)
    ]
    return changes, [d.key for d in differences if not _matches(d.key, FREE_ON_RESUME_KEYS)]


def data_differences(cfg: Config, state: TrainerState | None) -> list[DataChange]:
    """The data keys whose files hold other bytes than those the checkpoint recorded (checkpoints written before
    the record existed: none)."""
    if state is None or not state.data:
        return []

    now = data_identity(cfg.data)
    return [DataChange(key, old, now[key], str(data_path(cfg.data, key))) for key, old in state.data.items() if key in now and now[key] != old]


def config_differences(old: dict | None, cfg: Config) -> list[Difference]:
    """Keys whose values differ between a saved config and `cfg` (keys only one of them knows are skipped)."""
    before, after = flatten_keys(old if isinstance(old, dict) else {}), flatten_keys(yaml.safe_load(to_yaml(cfg)))
    differences = []
    for key in after:
        if key not in before:
            continue
        a, b = before[key], after[key]
        if key in PATH_KEYS and a is not None and b is not None:
            a, b = str(Path(a).resolve()), str(Path(b).resolve())
        if a != b:
            differences.append(Difference(key, before[key], after[key]))
    return differences


def refused(differences: list[Difference], allowed: list[str]) -> list[Difference]:
    return [d for d in differences if not _matches(d.key, FREE_ON_RESUME_KEYS) and not _matches(d.key, allowed)]


def check_end(start: StartingPoint, total_steps: int, cfg: Config) -> None:
    """Once the run's length is known: a checkpoint past its end is refused (the run would train nothing and
    write final weights of another length)."""
    if start.state is not None and start.state.step > total_steps:
        raise UsageError(
            f"resume: checkpoint '{start.checkpoint}' is at step {start.state.step}, past the end of this run"
            f" (step {total_steps}: train.max_steps {cfg.train.max_steps}, train.epochs {cfg.train.epochs});"
            f" set train.max_steps to {start.state.step} or more"
        )


def check_samples(start: StartingPoint, train_samples: int, cfg: Config) -> None:
    """Once the data is tokenized: another number of training samples than the checkpoint's means other data (a
    change identity.py cannot see, or a source it does not cover: data.name), unless a change was allowed."""
    recorded = start.state.train_samples if start.state is not None else None
    key = "data.name" if cfg.data.name is not None else "data.sources" if cfg.data.sources is not None else "data.path"
    if recorded is None or recorded == train_samples or start.allowed or _matches(key, cfg.resume_allow_changes):
        return
    where = ", ".join(str(s.path) for s in cfg.data.sources) if key == "data.sources" else getattr(cfg.data, key.removeprefix("data."))
    raise UsageError(
        f"resume: checkpoint '{start.checkpoint}' was trained on {recorded} training samples, this run has {train_samples}:"
        f" the data of {key} '{where or 'the built-in corpus'}' changed; restore the data,"
        f" or allow the change with resume_allow_changes=[{key}], or set output_dir=NEW_DIR for a new run"
    )


def _matches(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)
