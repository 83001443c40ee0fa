"""Experiment trackers beside metrics.jsonl: Weights & Biases and MLflow (TensorBoard stays in launcher.metrics).

One tracker run per launcher run: each tracker's run id is kept in output_dir/trackers.json (and in every
checkpoint's trainer_state.json), so a resume (resume=auto, a SLURM requeue, a restart) continues the same
tracker run. trackers.json also records, per metric, the last step the tracker received: after a resume the
rows of the steps between the checkpoint and the stop, which the stopped run sent already, are not sent again
(a bitwise resume computes the same losses; the tracker keeps the first timing of those steps).

Only the main process tracks, and no network call is on the step path: rows go through a bounded queue to one
background thread that starts, feeds and ends the tracker runs. A tracker that cannot be reached is one warning
line and is dropped for the rest of the run; metrics.jsonl holds every row regardless.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from tqdm.auto import tqdm

from launcher.checkpoints import STATE_FILE, complete_checkpoints
from launcher.config import Config, MlflowConfig, TrainConfig, WandbConfig, flatten_keys
from launcher.metrics import scalars

TRACKERS = ("tensorboard", "wandb", "mlflow")  # train.trackers; the extra that installs each has its name
MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
STATE = "trackers.json"
URI_SCHEMES = ("http", "https", "sqlite", "file", "postgresql", "mysql", "mssql", "databricks")
QUEUE_ROWS = 10_000  # rows waiting for a slow tracker; more are dropped (one warning), the step never waits
END_WAIT_S = 30  # the most the end of a run waits for the trackers to take the rows left and close


def uses_tensorboard(train: TrainConfig) -> bool:
    return train.tensorboard or "tensorboard" in train.trackers


def tracker_problems(cfg: Config) -> list[str]:
    """One line per tracker whose package is missing or whose settings are malformed (the validation pass)."""
    problems = []
    wanted = [*(["tensorboard"] if cfg.train.tensorboard else []), *cfg.train.trackers]
    for name in dict.fromkeys(wanted):
        try:
            __import__(MODULES[name])
        except ImportError:
            key = "train.tensorboard" if name == "tensorboard" and cfg.train.tensorboard else "train.trackers"
            problems.append(
                f"{key}: {name} needs the {MODULES[name]} package, not installed here; scripts/setup {name} (pip install -e '.[{name}]'),"
                f" or remove {name}"
            )
    uri = cfg.mlflow.tracking_uri
    if "mlflow" in cfg.train.trackers and uri is not None and (why := malformed_uri(uri)):
        problems.append(
            f"mlflow.tracking_uri: '{uri}' {why}; give http(s)://HOST:PORT, sqlite:///PATH.db, file:///FOLDER or null (sqlite in output_dir)"
        )
    return problems


def malformed_uri(uri: str) -> str | None:
    parsed = urlparse(uri)
    if parsed.scheme not in URI_SCHEMES:
        return f"has no known scheme ({', '.join(URI_SCHEMES)})" if parsed.scheme else "has no scheme"
    if parsed.scheme in ("http", "https"):
        try:
            parsed.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            return "has a port that is not a number"
        if not parsed.hostname:
            return "names no host"
    if parsed.scheme in ("sqlite", "file") and not parsed.path:
        return "names no path"
    return None


class WandbTracker:
    """A W&B run: offline (files under output_dir/wandb, `wandb sync` them later) or online; resumed by its id."""

    name = "wandb"

    def __init__(self, cfg: WandbConfig, output_dir: Path):
        self.cfg, self.output_dir, self.run = cfg, output_dir, None

    def start(self, run_id: str | None, params: dict) -> str:
        import wandb

        folder = self.output_dir / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=self.cfg.project,
            entity=self.cfg.entity,
            name=self.cfg.name or self.output_dir.name,
            tags=self.cfg.tags or None,
            mode=self.cfg.mode,
            dir=str(self.output_dir),
            id=run_id,
            resume="allow",  # W&B refuses steps below its current one: the already sent ones are skipped (see Trackers)
            config=params,
            allow_val_change=True,  # a resume may change the free keys (train.max_steps, ...)
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
        )
        return self.run.id

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def end(self, summary: dict) -> None:
        for key in ("eval_loss", "final"):
            if summary.get(key) is not None:
                self.run.summary[key] = summary[key]
        if summary.get("preempted"):
            self.run.mark_preempting()
        self.run.finish(exit_code=0 if summary.get("final") is not None else 1)


class MlflowTracker:
    """An MLflow run through MlflowClient (no global state): metrics by step, the config as params, final/ as a tag."""

    name = "mlflow"

    def __init__(self, cfg: MlflowConfig, output_dir: Path):
        self.cfg, self.output_dir = cfg, output_dir
        self.uri = cfg.tracking_uri or f"sqlite:///{output_dir.absolute() / 'mlflow.db'}"
        # MLflow retries an unreachable server for minutes by default: here a dead server is given up in seconds
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

    def start(self, run_id: str | None, params: dict) -> str:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = client = MlflowClient(self.uri)
        if run_id is None:
            experiment = client.get_experiment_by_name(self.cfg.experiment)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(self.cfg.experiment)
            run_id = client.create_run(experiment_id, run_name=self.cfg.run_name or self.output_dir.name).info.run_id
            known = {}
        else:
            known = client.get_run(run_id).data.params
            client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        # a parameter cannot change in MLflow: a resume only adds the ones the run lacks
        fresh = [Param(key, str(value)[:6000]) for key, value in params.items() if key not in known]
        for i in range(0, len(fresh), 100):  # MLflow takes at most 100 params a call
            client.log_batch(run_id, params=fresh[i : i + 100])
        return run_id

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now_ms, step) for key, value in values.items()]
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics a call
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def end(self, summary: dict) -> None:
        if summary.get("final") is not None:
            self.client.set_tag(self.run_id, "launcher.final", summary["final"])  # the path only: no multi-GB upload
        status = "FINISHED" if summary.get("final") is not None else "KILLED" if summary.get("preempted") else "FAILED"
        self.client.set_terminated(self.run_id, status)


@dataclass
class End:
    summary: dict


def make_trackers(cfg: Config) -> list:
    made = {"wandb": lambda: WandbTracker(cfg.wandb, cfg.output_dir), "mlflow": lambda: MlflowTracker(cfg.mlflow, cfg.output_dir)}
    return [made[name]() for name in dict.fromkeys(cfg.train.trackers) if name in made]


class Trackers:
    """The main process's trackers, fed by one background thread. `log` never waits; `end` waits at most END_WAIT_S."""

    def __init__(self, trackers: list, output_dir: Path, start_step: int, params: dict, err=None):
        self.output_dir, self.err = output_dir, err or sys.stderr
        self.state = read_state(output_dir, start_step)
        self.lock = threading.Lock()  # the state: written by the thread, read by checkpoints on the loop's thread
        self.rows: queue.Queue = queue.Queue(QUEUE_ROWS)
        self.dropped = False
        self.thread = threading.Thread(target=self._serve, args=(trackers, params), name="launcher-trackers", daemon=True)
        self.thread.start()

    def log(self, row: dict) -> None:
        try:
            self.rows.put_nowait(row)
        except queue.Full:
            if not self.dropped:
                self.dropped = True
                self.warn(f"trackers: more than {QUEUE_ROWS} rows wait for a slow tracker; rows are dropped there (metrics.jsonl has them)")

    def run_ids(self) -> dict[str, str]:
        """Each started tracker's run id, for the checkpoint."""
        with self.lock:
            return {name: entry["run_id"] for name, entry in self.state.items() if entry.get("run_id")}

    def end(self, summary: dict) -> None:
        """After the last row: the final eval loss and final/'s path, then each tracker run is closed."""
        self.rows.put(End(summary))  # the thread takes rows until it reads this one: the queue cannot stay full
        self.thread.join(END_WAIT_S)
        if self.thread.is_alive():
            self.warn(f"trackers: not done after {END_WAIT_S} s at the end of the run; the rest is not sent (metrics.jsonl has every row)")

    def warn(self, text: str) -> None:
        tqdm.write(f"launcher: warning: {text}", file=self.err)

    def _serve(self, trackers: list, params: dict) -> None:
        live = []
        for tracker in trackers:
            entry = self.state.setdefault(tracker.name, {})
            try:
                run_id = tracker.start(entry.get("run_id"), params)
            except Exception as err:  # noqa: BLE001 - a server down, a bad credential: training goes on without it
                self.warn(f"{tracker.name}: could not start its run ({_reason(err)}); training goes on, metrics.jsonl has every row")
                continue
            with self.lock:
                entry["run_id"] = run_id
                entry.setdefault("last_step", {})
            live.append(tracker)
        self._save()
        while True:
            row = self.rows.get()
            if isinstance(row, End):
                break
            for tracker in list(live):
                last = self.state[tracker.name]["last_step"]
                # steps this tracker run holds already (sent before a stop, after the checkpoint resumed): not twice
                values = {key: value for key, value in scalars(row) if row["step"] > last.get(key, -1)}
                if not values:
                    continue
                try:
                    tracker.log(row["step"], values)
                except Exception as err:  # noqa: BLE001
                    self.warn(f"{tracker.name}: logging failed ({_reason(err)}); no more rows go there this run, metrics.jsonl has every row")
                    live.remove(tracker)
                    continue
                with self.lock:
                    last.update(dict.fromkeys(values, row["step"]))
            self._save()
        for tracker in live:
            try:
                tracker.end(row.summary)
            except Exception as err:  # noqa: BLE001
                self.warn(f"{tracker.name}: closing its run failed ({_reason(err)})")

    def _save(self) -> None:
        with self.lock:
            text = json.dumps(self.state, indent=1)
        temporary = self.output_dir / f".{STATE}.tmp"
        try:
            temporary.write_text(text)
            temporary.replace(self.output_dir / STATE)
        except OSError:  # a full disk: the metrics write reports it and stops the run
            pass


def read_state(output_dir: Path, start_step: int) -> dict:
    """output_dir/trackers.json; without it (deleted), the run ids of the checkpoint resumed (under output_dir only:
    a run in a new output_dir gets new tracker runs)."""
    try:
        return json.loads((output_dir / STATE).read_text())
    except (OSError, ValueError):
        pass
    for checkpoint in complete_checkpoints(output_dir) if start_step else []:
        state = json.loads((checkpoint / STATE_FILE).read_text())
        if state["step"] == start_step:
            return {name: {"run_id": run_id, "last_step": {}} for name, run_id in state.get("trackers", {}).items()}
    return {}


def open_trackers(cfg: Config, start_step: int, facts: dict) -> Trackers | None:
    """The trackers of train.trackers (main process only), with the resolved config and the run's facts as parameters."""
    trackers = make_trackers(cfg)
    if not trackers:
        return None
    params = {**flatten_keys(cfg.model_dump(mode="json")), **{f"run.{key}": value for key, value in facts.items()}}
    return Trackers(trackers, cfg.output_dir, start_step, params)


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:200] + "..."
