"""Atomic checkpoints: SIGKILL at random moments while a run writes a checkpoint every step (and deletes old ones)
never leaves a latest checkpoint that cannot be loaded."""

import os
import random
import signal
import subprocess
import time
from pathlib import Path

from launcher.build import build_run
from launcher.checkpoints import complete_checkpoints
from launcher.config import load_config

from conftest import PYTHON, REPO, cpu_env, reset_accelerate, tiny_config, write_config

KILLS = 12  # half of them aimed inside a save


def test_sigkill_during_checkpoint_writes_leaves_a_loadable_latest(tmp_path: Path, fresh_accelerate):
    out = tmp_path / "out"
    # 3.2M parameters: a checkpoint (weights and AdamW state, ~40 MB, fsynced) takes long enough to be hit
    config = write_config(
        tmp_path / "c.yaml",
        tiny_config(
            tmp_path,
            model={"n_layer": 4, "n_head": 4, "d_model": 256},
            data={"eval_fraction": 0},
            train={"max_steps": 100000, "micro_batch_size": 4, "log_every": 1000},
            checkpoint={"every_steps": 1, "keep_last": 2},
            resume="auto",
        ),
    )
    rng = random.Random(0)
    loaded_steps, kills_mid_write = [], 0
    for attempt in range(KILLS):
        proc = subprocess.Popen(
            [PYTHON, "-m", "launcher", "train", str(config)],
            cwd=REPO,
            env=cpu_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            before = len(complete_checkpoints(out)) and complete_checkpoints(out)[-1].name
            deadline = time.monotonic() + 120
            while not complete_checkpoints(out) or complete_checkpoints(out)[-1].name == before:
                assert proc.poll() is None and time.monotonic() < deadline, "the run died or wrote no checkpoint"
                time.sleep(0.01)
            if attempt % 2:  # at any moment of a step
                time.sleep(rng.uniform(0.0, 0.3))
            else:  # soon after the next save has started: inside the write, the rename or the rotation
                while not any(p.name.startswith(".partial-") for p in (out / "checkpoints").iterdir()):
                    assert proc.poll() is None and time.monotonic() < deadline
                    time.sleep(0.002)
                time.sleep(rng.uniform(0.0, 0.05))
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        kills_mid_write += any(p.name.startswith(".partial-") for p in (out / "checkpoints").iterdir())
        latest = complete_checkpoints(out)[-1]
        reset_accelerate()
        run = build_run(load_config(config))  # resume=auto: raises if the newest complete checkpoint cannot load
        assert run.start_step == int(latest.name.split("-")[1])
        loaded_steps.append(run.start_step)
        run.lock.release()  # the next run is started as a process of its own
        del run
    assert loaded_steps == sorted(loaded_steps) and loaded_steps[-1] > loaded_steps[0]
    print(f"{KILLS} kills, {kills_mid_write} of them during a checkpoint write; resumed at steps {loaded_steps}")
    assert kills_mid_write >= 3, "too few kills landed inside a checkpoint write to show anything"
