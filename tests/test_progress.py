"""Progress output that suits where it goes: a bar on a terminal, one plain line per metrics row in a log file
or a pipe (SLURM), never carriage-return frames there."""

import io
import os
import re
import select
import struct
import subprocess
import termios
import time
from fcntl import ioctl
from pathlib import Path

from launcher.metrics import MetricsLog

from conftest import PYTHON, REPO, check, cpu_env, metrics, run_cli, tiny_config, write_config

LINE = re.compile(
    r"^step (\d+)/(\d+) \| loss (\S+) \| lr (\S+) \| grad_norm (\S+) \| ([\d,]+) tokens/s"
    r"(?: \| mfu ([\d.]+)%)? \| elapsed \d+:\d\d:\d\d, left ~\d+:\d\d:\d\d$"
)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def train_row(step: int, **extra) -> dict:
    return {
        "step": step,
        "epoch": 0,
        "loss": 2.5,
        "tokens_per_s": 12345.6,
        "s_per_step": 0.5,
        "lr": 3e-4,
        "grad_norm": 1.25,
        "skipped_steps": 0,
        "nonfinite_steps": 0,
        **extra,
    }


def test_lines_without_a_terminal_and_a_bar_on_one(tmp_path: Path):
    out, err = io.StringIO(), io.StringIO()
    log = MetricsLog(tmp_path / "a.jsonl", True, total_steps=20, out=out, err=err)
    for step in range(1, 21):
        log.advance()
        if step % 10 == 0:
            log.write(train_row(step, mfu=0.4123, max_memory_allocated_gb=10.5, max_memory_reserved_gb=12.25))
    log.write({"step": 20, "eval_loss": 2.25, "eval_tokens": 2048})
    log.write({"step": 20, "grad_norm_by_layer": {"blocks.0": 1.0}})  # diagnostics rows make no line
    log.close()
    assert err.getvalue() == ""
    lines = out.getvalue().splitlines()
    assert lines[0] == (
        "step 10/20 | loss 2.5000 | lr 3.000e-04 | grad_norm 1.25 | 12,346 tokens/s | mfu 41.2%"
        f" | mem 10.50 GiB (reserved 12.25) | elapsed {lines[0].split('elapsed ')[1]}"
    )
    assert lines[0].endswith(", left ~0:00:05")  # 10 steps left at 0.5 s/step
    assert lines[1].startswith("step 20/20 | loss 2.5000") and lines[1].endswith(", left ~0:00:00")
    assert lines[2] == "step 20/20 | eval_loss 2.2500 on 2,048 tokens"
    assert len(lines) == 3

    out, err = Terminal(), Terminal()
    log = MetricsLog(tmp_path / "b.jsonl", True, total_steps=20, out=out, err=err)
    for step in range(1, 21):
        log.advance()
        if step % 10 == 0:
            log.write(train_row(step, mfu=0.4123, max_memory_allocated_gb=10.5, max_memory_reserved_gb=12.25))
    log.close()
    assert out.getvalue() == ""  # a terminal has the bar, on stderr
    assert "\r" in err.getvalue() and "20/20" in err.getvalue()
    assert "mfu=41.2%" in err.getvalue() and "mem=10.5G" in err.getvalue()

    # stdout to a file while stderr is a terminal: the bar there, and the lines in the file
    out, err = io.StringIO(), Terminal()
    log = MetricsLog(tmp_path / "c.jsonl", True, total_steps=20, out=out, err=err)
    log.write(train_row(10))
    log.close()
    assert out.getvalue().startswith("step 10/20 | loss 2.5000 | lr 3.000e-04 | grad_norm 1.25 | 12,346 tokens/s | elapsed")

    out, err = io.StringIO(), io.StringIO()  # other ranks print nothing
    log = MetricsLog(tmp_path / "d.jsonl", False, total_steps=20, out=out, err=err)
    log.write(train_row(10))
    log.close()
    assert out.getvalue() == err.getvalue() == ""


def test_a_launched_run_writes_one_plain_line_per_log_step_to_a_pipe(tmp_path: Path):
    """2 gloo ranks under torchrun, stdout and stderr to pipes as in a SLURM job: no carriage return anywhere,
    one line per metrics row (with mfu from train.peak_tflops), matching metrics.jsonl."""
    config = write_config(
        tmp_path / "c.yaml", tiny_config(tmp_path, train={"max_steps": 6, "log_every": 2, "peak_tflops": 0.01}, eval={"every_steps": 3})
    )
    proc = check(run_cli("train", str(config), nproc=2))
    assert "\r" not in proc.stdout and "\r" not in proc.stderr
    rows = [r for r in metrics(tmp_path / "out") if "loss" in r]
    lines = [LINE.match(line) for line in proc.stdout.splitlines() if LINE.match(line)]
    assert [int(m[1]) for m in lines] == [r["step"] for r in rows] == [2, 4, 6]
    for match, row in zip(lines, rows):
        assert match[2] == "6" and match[3] == f"{row['loss']:.4f}" and match[5] == f"{row['grad_norm']:.4g}"
        assert match[7] == f"{100 * row['mfu']:.1f}"
    evals = [line for line in proc.stdout.splitlines() if "eval_loss" in line]
    assert [line.split(" |")[0] for line in evals] == ["step 3/6", "step 6/6"]
    assert sum(line.startswith("step ") for line in proc.stdout.splitlines()) == 5


def test_a_run_on_a_terminal_shows_the_bar_and_no_lines(tmp_path: Path):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, train={"max_steps": 6, "log_every": 2}))
    output = run_on_terminal([PYTHON, "-m", "launcher", "train", str(config)], cpu_env())
    assert "100%|" in output and "6/6" in output and "\r" in output  # tqdm's frames
    assert not re.search(r"^step \d+/6 \|", output, re.MULTILINE)


def run_on_terminal(cmd: list[str], env: dict, timeout_s: float = 300) -> str:
    """Run with stdout and stderr on a pseudo-terminal (120 columns, no newline translation); return what it wrote."""
    master, slave = os.openpty()
    ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.ONLCR  # keep "\n" as it is, so a "\r" in the output is the program's own
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks, deadline_s = [], time.monotonic() + timeout_s
    try:
        while select.select([master], [], [], max(0.0, deadline_s - time.monotonic()))[0]:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every holder of the terminal has exited
                break
            if not data:
                break
            chunks.append(data)
        assert proc.wait(timeout=max(1.0, deadline_s - time.monotonic())) == 0, b"".join(chunks).decode(errors="replace")[-3000:]
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return b"".join(chunks).decode(errors="replace")
