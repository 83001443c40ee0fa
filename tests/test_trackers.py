"""Experiment trackers (train.trackers): a real `mlflow server` and W&B's offline files hold every metrics row once,
in one tracker run across a SIGTERM and a resume=auto; a tracker server that dies mid-run costs one warning."""

import json
import os
import signal
import struct
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import PYTHON, check, disk_snapshot, free_port, metrics, run_cli, tiny_config, train_until_rows, wait_for_rows, write_config

mlflow = pytest.importorskip("mlflow", reason="the mlflow extra: scripts/setup mlflow")
wandb_pb = pytest.importorskip("wandb.proto.wandb_internal_pb2", reason="the wandb extra: scripts/setup wandb")

COMPARED = ("loss", "lr", "grad_norm", "eval_loss")  # the values a bitwise resume computes again exactly


class MlflowServer:
    """`mlflow server` on a free localhost port with a SQLite store in `folder`."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.uri = f"http://127.0.0.1:{free_port()}"
        port = self.uri.rsplit(":", 1)[1]
        cmd = [str(Path(PYTHON).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", port, "--workers", "1"]
        cmd += ["--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--default-artifact-root", str(folder / "artifacts")]
        self.proc = subprocess.Popen(cmd, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            assert self.proc.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.2)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its uvicorn worker
            self.proc.wait(timeout=30)


def mlflow_history(uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    client = mlflow.tracking.MlflowClient(uri)
    run = client.get_run(run_id)
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in run.data.metrics}


def wandb_records(path: Path):
    """The records of a W&B offline run file (its LevelDB-style log: 7-byte file header, 32 KiB blocks, 7-byte record
    headers of CRC-32, length and kind: 1 whole, 2 first, 3 middle, 4 last part)."""
    data, pos, parts = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # the block's padding
            pos += left
            continue
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_pb.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def wandb_history(out: Path) -> tuple[set[str], dict[str, list[tuple[int, float]]]]:
    """The run ids of every offline run folder under out/wandb, and every value they hold by key."""
    ids, history = set(), {}
    for path in sorted(out.glob("wandb/offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            if record.WhichOneof("record_type") == "run":
                ids.add(record.run.run_id)
            elif record.WhichOneof("record_type") == "history":
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    if not key.startswith("_"):
                        history.setdefault(key, []).append((record.history.step.num, json.loads(item.value_json)))
    return ids, {key: sorted(values) for key, values in history.items()}


def jsonl_history(out: Path) -> dict[str, list[tuple[int, float]]]:
    history = {}
    for row in metrics(out):
        for key in COMPARED:
            if key in row:
                history.setdefault(key, []).append((row["step"], row[key]))
    return history


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.kill()


def started_with_trackers(config: Path, out: Path, names: tuple[str, ...], *overrides: str):
    """`launcher train` returned once every tracker of `names` has its run (trackers.json) and two more rows were
    written after that (so rows reached the trackers); the config's max_steps is far enough away for that."""
    proc = train_until_rows(config, out, 1, *overrides, timeout_s=240, new_session=True)
    deadline = time.monotonic() + 240
    while True:
        try:
            state = json.loads((out / "trackers.json").read_text())
        except (OSError, ValueError):
            state = {}
        if all(state.get(name, {}).get("run_id") for name in names):
            break
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    wait_for_rows(out, len([r for r in metrics(out) if "loss" in r]) + 2, lambda: proc.poll() is None)
    return proc


@pytest.fixture(scope="module")
def resumed(server, tmp_path_factory):
    """A 2-rank run tracked by MLflow and W&B (offline), stopped by SIGTERM, its checkpoint of the stop removed (as if a
    SIGKILL had come before that save: the trackers hold steps past the checkpoint resumed), then resumed with
    resume=auto to 3 steps after the stop."""
    tmp_path = tmp_path_factory.mktemp("resumed")
    # a constant learning rate: the resume's other max_steps changes no value of a step (cosine's would)
    train = {"trackers": ["mlflow", "wandb"], "max_steps": 1000, "log_every": 1, "lr_schedule": "constant"}
    config = tiny_config(tmp_path, train=train, eval={"every_steps": 4}, checkpoint={"every_steps": 3, "keep_last": 1000})
    config.update(mlflow={"tracking_uri": server.uri, "experiment": "resumed"}, launch={"nproc_per_node": 2})
    path, out = write_config(tmp_path / "c.yaml", config), tmp_path / "out"
    stopped = started_with_trackers(path, out, ("mlflow", "wandb"))
    os.killpg(stopped.pid, signal.SIGTERM)
    _, stderr = stopped.communicate(timeout=180)
    assert "launcher: warning" not in stderr, stderr[-3000:]
    marker = json.loads((out / "preempted.json").read_text())
    before = json.loads((out / "trackers.json").read_text())
    stop_checkpoint = Path(marker["checkpoint"])
    for file in sorted(stop_checkpoint.rglob("*"), reverse=True):
        file.unlink() if file.is_file() else file.rmdir()
    stop_checkpoint.rmdir()
    steps = marker["step"] + 3
    proc = check(run_cli("train", str(path), "resume=auto", f"train.max_steps={steps}", timeout=300))
    return out, marker["step"], steps, before, proc


def test_the_resumed_run_continues_one_mlflow_run_holding_each_step_once(server, resumed):
    out, stop_step, steps, before, proc = resumed
    assert "resumed from" in proc.stdout and f"at step {3 * ((stop_step - 1) // 3)}" in proc.stdout  # the checkpoint before the stop
    state = json.loads((out / "trackers.json").read_text())
    run_id = state["mlflow"]["run_id"]
    assert run_id == before["mlflow"]["run_id"] and before["mlflow"]["last_step"]["loss"] >= stop_step
    client = mlflow.tracking.MlflowClient(server.uri)
    experiment = client.get_experiment_by_name("resumed")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]
    history = mlflow_history(server.uri, run_id)
    rows = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for key in ("loss", "tokens_per_s", "s_per_step", "lr", "grad_norm", "epoch"):  # every step once, no duplicate
        assert [step for step, _ in history[key]] == list(range(1, steps + 1)), key
    assert [step for step, _ in history["eval_loss"]] == sorted({*range(4, steps + 1, 4), steps})
    expected = jsonl_history(out)
    for key in COMPARED:  # the stopped run's values of steps past the checkpoint equal the resumed run's
        assert history[key] == expected[key], key
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["launcher.final"] == str(out / "final" / "model.safetensors")
    assert run.data.params["run.world_size"] == "2" and run.data.params["run.global_batch_size"] == "8"
    assert run.data.params["run.trainable_parameters"] == "42752" and run.data.params["train.max_steps"] == "1000"
    final_state = json.loads((out / "checkpoints" / f"step-{steps:09d}" / "trainer_state.json").read_text())
    assert final_state["trackers"] == {"mlflow": run_id, "wandb": state["wandb"]["run_id"]}


def test_the_wandb_offline_files_hold_each_step_once_under_one_run_id(resumed):
    out, _, steps, before, _ = resumed
    ids, history = wandb_history(out)
    assert ids == {before["wandb"]["run_id"]}
    assert len(list(out.glob("wandb/offline-run-*"))) == 2  # one folder per launch, to `wandb sync` together
    for key in ("loss", "tokens_per_s", "lr", "grad_norm"):
        assert [step for step, _ in history[key]] == list(range(1, steps + 1)), key
    expected = jsonl_history(out)
    for key in COMPARED:
        assert history[key] == expected[key], key


def test_a_tracker_server_that_dies_mid_run_is_one_warning_and_the_run_finishes(server, tmp_path: Path):
    """Kills the module's server: the last test of the module that uses it."""
    steps = 300
    config = tiny_config(tmp_path, train={"trackers": ["mlflow"], "max_steps": steps, "log_every": 1}, mlflow={"tracking_uri": server.uri})
    path, out = write_config(tmp_path / "c.yaml", config), tmp_path / "out"
    proc = started_with_trackers(path, out, ("mlflow",))
    server.kill()
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    warnings = [line for line in stderr.splitlines() if line.startswith("launcher: warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("launcher: warning: mlflow: logging failed ("), warnings
    assert warnings[0].endswith("; no more rows go there this run, metrics.jsonl has every row")
    assert [r["step"] for r in metrics(out) if "loss" in r] == list(range(1, steps + 1))
    assert "Traceback" not in stdout + stderr


BAD = {
    "unknown tracker": (
        ["train.trackers=[mlflow,comet]"],
        "train.trackers.1: input should be 'tensorboard', 'wandb' or 'mlflow' (got 'comet'); set train.trackers.1 to one of 'tensorboard', 'wandb' or 'mlflow'",
    ),
    "no scheme": (
        ["train.trackers=[mlflow]", "mlflow.tracking_uri=localhost:5000"],
        "mlflow.tracking_uri: 'localhost:5000' has no known scheme (http, https, sqlite, file, postgresql, mysql, mssql, databricks);"
        " give http(s)://HOST:PORT, sqlite:///PATH.db, file:///FOLDER or null (sqlite in output_dir)",
    ),
    "port not a number": (
        ["train.trackers=[mlflow]", "mlflow.tracking_uri=http://localhost:50x0"],
        "mlflow.tracking_uri: 'http://localhost:50x0' has a port that is not a number;"
        " give http(s)://HOST:PORT, sqlite:///PATH.db, file:///FOLDER or null (sqlite in output_dir)",
    ),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_tracker_settings_are_one_line_and_exit_2_before_training(tmp_path: Path, name: str):
    overrides, line = BAD[name]
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    before = disk_snapshot(tmp_path)
    proc = run_cli("train", str(path), *overrides)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().endswith(line), proc.stderr[-2000:]
    assert disk_snapshot(tmp_path) == before


def test_a_tracker_server_that_cannot_be_reached_at_the_start_is_one_warning(tmp_path: Path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    config = tiny_config(tmp_path, train={"trackers": ["mlflow"], "max_steps": 4, "log_every": 1}, mlflow={"tracking_uri": uri})
    proc = check(run_cli("train", str(write_config(tmp_path / "c.yaml", config))))
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("launcher: warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("launcher: warning: mlflow: could not start its run ("), warnings
    assert warnings[0].endswith("); training goes on, metrics.jsonl has every row")
    assert [r["step"] for r in metrics(tmp_path / "out") if "loss" in r] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "out" / "trackers.json").read_text()) == {"mlflow": {}}  # no run: a restart tries again
