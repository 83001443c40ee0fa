"""What identifies the data (launcher.data.identity): a data file rewritten with the same size and time is read
again, never from a cache of its old bytes; a resume on grown data is refused (or allowed and said); a tokenized
cache entry that is truncated or holds other bytes is built again with a warning naming the file."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from launcher.data.identity import check_entry, manifest_path

from conftest import check, disk_snapshot, final_weights, run_cli, tiny_config, write_config


def line_of(n_chars: int, i: int) -> str:
    return json.dumps({"text": "".join("abcdefghij"[(i + k) % 10] for k in range(n_chars))}) + "\n"


def training_samples(proc) -> int:
    return int(re.search(r"; (\d+) training samples of", proc.stdout).group(1))


def one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launcher: error: "), proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def first(tmp_path_factory) -> dict:
    """A 4-step run (checkpoints at steps 2 and 4) on 20 documents of 60 characters (73 bytes a line), its data
    cached under its own data.cache_dir."""
    tmp_path = tmp_path_factory.mktemp("first")
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(line_of(60, i) for i in range(20)))
    config = tiny_config(
        tmp_path,
        data={"path": str(data), "cache_dir": str(tmp_path / "cache")},
        train={"lr_schedule": "constant", "warmup_steps": 0},
        checkpoint={"every_steps": 2},
    )
    path = write_config(tmp_path / "c.yaml", config)
    proc = check(run_cli("train", str(path)))
    shutil.copytree(tmp_path / "cache", tmp_path / "pristine-cache")  # as this run left it: other tests add entries
    return {"config": path, "data": data, "cache": tmp_path / "pristine-cache", "out": tmp_path / "out", "proc": proc}


@pytest.fixture
def data_restored(first):
    """The test may rewrite the module's data file: its bytes and times come back afterwards."""
    data, stat = first["data"], first["data"].stat()
    saved = data.read_bytes()
    yield data
    data.write_bytes(saved)
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_file_rewritten_with_the_same_size_and_time_is_tokenized_again(tmp_path: Path, first, data_restored):
    data = data_restored
    stat = data.stat()
    # 10 documents of 133 characters: 146 bytes a line, two of the old lines, so the file keeps its 1460 bytes
    data.write_text("".join(line_of(133, i) for i in range(10)))
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert data.stat().st_size == stat.st_size == 1460 and data.stat().st_mtime_ns == stat.st_mtime_ns
    warm = check(run_cli("train", str(first["config"]), f"output_dir={tmp_path / 'warm'}"))
    cold = check(run_cli("train", str(first["config"]), f"output_dir={tmp_path / 'cold'}", f"data.cache_dir={tmp_path / 'cold-cache'}"))
    # 18 of 20 old documents (eval_fraction 0.1) in rows of 33 bytes: 2 rows each; 9 of the 10 new ones: 5 rows each
    assert training_samples(first["proc"]) == 36
    assert training_samples(warm) == training_samples(cold) == 45
    warm_weights, cold_weights = final_weights(tmp_path / "warm"), final_weights(tmp_path / "cold")
    assert all(torch.equal(warm_weights[name], cold_weights[name]) for name in cold_weights)


def test_resume_on_grown_data_is_refused_and_allowed_when_asked(tmp_path: Path, first, data_restored):
    data = data_restored
    out = tmp_path / "run"
    shutil.copytree(first["out"], out)
    before = disk_snapshot(out)
    with data.open("a") as f:
        f.write("".join(line_of(60, i) for i in range(20, 40)))
    resume = ("train", str(first["config"]), f"output_dir={out}", "resume=auto", "train.max_steps=6")
    line = one_error_line(run_cli(*resume))
    assert line == (
        f"launcher: error: resume: the data differs from checkpoint '{out / 'checkpoints' / 'step-000000004'}' in what it trains:"
        f" data.path '{data}' holds other data than the checkpoint was trained on (1 file(s), 1460 bytes -> 1 file(s), 2920 bytes);"
        " restore the data, or allow the change with resume_allow_changes=[data.path], or set output_dir=NEW_DIR for a new run"
    )
    assert disk_snapshot(out) == before
    proc = check(run_cli(*resume, "resume_allow_changes=[data.path]"))
    assert f"resumed from {out / 'checkpoints' / 'step-000000004'} at step 4" in proc.stdout
    assert (
        f"changed since the checkpoint: train.max_steps 4 -> 6, data.path '{data}' holds other data than the checkpoint was trained on"
        " (1 file(s), 1460 bytes -> 1 file(s), 2920 bytes) (resume_allow_changes)"
    ) in proc.stdout
    assert training_samples(proc) == 72  # 36 of 40 documents, 2 rows each
    state = json.loads((out / "checkpoints" / "step-000000006" / "trainer_state.json").read_text())
    assert state["train_samples"] == 72 and state["data"]["data.path"]["bytes"] == 2920


def damaged_cache(first, tmp_path: Path, damage) -> tuple[Path, list[Path]]:
    """A copy of the first run's cache with `damage(file)` done to each tokenized file."""
    cache = tmp_path / "cache"
    shutil.copytree(first["cache"], cache)
    files = sorted((cache / "tokenized").glob("*.arrow"))
    assert len(files) == 4  # the training and the held-out split, each tokenized (stage 1) and laid out in rows (stage 2)
    for file in files:
        damage(file)
    return cache, files


def truncate(file: Path) -> None:
    os.truncate(file, file.stat().st_size // 2)


def overwrite_middle(file: Path) -> None:
    with file.open("r+b") as f:
        f.seek(file.stat().st_size // 2)
        f.write(bytes(range(200, 232)))


@pytest.mark.parametrize("damage", [truncate, overwrite_middle])
def test_a_damaged_cache_entry_is_built_again_with_a_warning_naming_it(tmp_path: Path, first, damage):
    sizes = {}
    cache, files = damaged_cache(first, tmp_path, lambda f: (sizes.__setitem__(f.name, f.stat().st_size), damage(f)))
    proc = check(run_cli("train", str(first["config"]), f"output_dir={tmp_path / 'out'}", f"data.cache_dir={cache}"))
    for file in files:
        problem = (
            f"has {sizes[file.name] // 2} bytes, {sizes[file.name]} were written" if damage is truncate else "holds other bytes than were written"
        )
        assert f"data: the tokenized cache file '{file}' {problem}; building it again\n" in proc.stdout
    assert training_samples(proc) == 36
    rebuilt, expected = final_weights(tmp_path / "out"), final_weights(first["out"])
    assert all(torch.equal(rebuilt[name], expected[name]) for name in expected)
    # built again, with its manifest: the next run reads it without a word
    assert all(check_entry(file) is None and manifest_path(file).is_file() for file in files)


def test_another_number_of_training_samples_on_resume_is_refused(tmp_path: Path):
    """data.name (a local folder here) is identified by datasets, not by the launcher: the number of samples is."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(line_of(60, i) for i in range(20)))
    config = tiny_config(tmp_path, data={"path": None, "name": str(folder)}, checkpoint={"every_steps": 2})
    path = write_config(tmp_path / "c.yaml", config)
    out = tmp_path / "out"
    check(run_cli("train", str(path)))
    with (folder / "train.jsonl").open("a") as f:
        f.write("".join(line_of(60, i) for i in range(20, 40)))
    before = disk_snapshot(out)
    line = one_error_line(run_cli("train", str(path), "resume=auto", "train.max_steps=6"))
    assert line == (
        f"launcher: error: resume: checkpoint '{out / 'checkpoints' / 'step-000000004'}' was trained on 36 training samples,"
        f" this run has 72: the data of data.name '{folder}' changed; restore the data, or allow the change with"
        " resume_allow_changes=[data.name], or set output_dir=NEW_DIR for a new run"
    )
    assert disk_snapshot(out) == before
