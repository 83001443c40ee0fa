"""`plot_run`: charts of a real run and of hand-written metrics (nan, null, repeated steps), and bad input."""

import json
import math
from pathlib import Path

import matplotlib.image
import pytest
from matplotlib.figure import Figure

from launcher.build import build_run
from launcher.config import load_config
from launcher.errors import UsageError
from launcher.loop import train
from launcher.plots import draw_grad_norm, draw_loss, draw_memory, draw_mfu, plot_run, read_run

from conftest import disk_snapshot, metrics, tiny_config, write_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALWAYS = {"loss.png", "lr.png", "grad_norm.png", "throughput.png", "overview.png"}


def assert_readable_png(path: Path, min_bytes: int = 10_000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert len(data) > min_bytes, f"{path.name} is only {len(data)} bytes: an empty chart?"
    height, width, _ = matplotlib.image.imread(path).shape
    assert height > 300 and width > 500, f"{path.name} is {width}x{height}"


def write_rows(path: Path, rows: list, tail: str = "") -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows) + tail)
    return path


def train_row(step: int, loss, grad_norm, skipped: int = 0, **extra) -> dict:
    return {
        "step": step,
        "epoch": 0,
        "loss": loss,
        "tokens_per_s": 1000.0 + step,
        "s_per_step": 0.05,
        "lr": 1e-3 * min(1, step / 3),
        "grad_norm": grad_norm,
        "skipped_steps": skipped,
        **extra,
    }


def test_a_real_run_is_plotted(tmp_path: Path, fresh_accelerate):
    config = tiny_config(tmp_path, train={"max_steps": 6, "log_every": 1}, eval={"every_steps": 3}, data={"eval_fraction": 0.1})
    run = build_run(load_config(write_config(tmp_path / "c.yaml", config)), overwrite=True)
    train(run)
    out = run.cfg.output_dir
    rows = metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if "eval_loss" in r] == [3, 6], "the test needs eval rows to draw"
    before = disk_snapshot(out)

    written = plot_run(out)

    has_layers = any("grad_norm_by_layer" in r for r in rows)
    assert {p.name for p in written} == ALWAYS | ({"grad_norm_by_layer.png"} if has_layers else set())
    assert all(p.parent == out / "plots" for p in written)
    for path in written:
        assert_readable_png(path)
    after = disk_snapshot(out)
    assert {k: v for k, v in after.items() if not k.startswith("plots/")} == before, "plot_run changed the run's files"
    assert sorted(k for k in after if k.startswith("plots/")) == sorted(f"plots/{p.name}" for p in written)

    # what a reader needs from the two main charts: the clip line at the run's threshold, and both losses
    loaded = read_run(out)
    assert loaded.max_grad_norm == 1.0
    ax = Figure().add_subplot()
    draw_grad_norm(ax, loaded)
    clip = [line for line in ax.get_lines() if line.get_label() == "clip threshold (train.max_grad_norm = 1)"]
    assert len(clip) == 1 and list(clip[0].get_ydata()) == [1.0, 1.0]
    ax = Figure().add_subplot()
    draw_loss(ax, loaded)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train (mean over each log interval)", "eval (held-out split)"]
    assert ax.get_xlabel() == "optimizer step" and "nats/token" in ax.get_ylabel()


def test_hand_written_metrics_with_nan_null_repeats_and_layers(tmp_path: Path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("train:\n  max_grad_norm: 0.5\n")

    def layers(k):
        return {"tok_embed": 0.5 * k, "blocks.0": 0.3 * k, "blocks.1": "nan" if k == 2 else 0.2 * k, "ln_f": 0.01 * k}

    write_rows(
        out / "metrics.jsonl",
        [
            train_row(1, 8.0, 3.0),  # an older file: no nonfinite_steps key
            train_row(2, 6.0, None),  # grad_norm not measured on this step
            {"step": 2, "grad_norm_by_layer": layers(1)},
            train_row(3, 9.9, 2.0),
            train_row(3, 5.0, 2.5, nonfinite_steps=0),  # the same step again: this row wins
            {"step": 3, "eval_loss": 5.5, "eval_tokens": 100},
            train_row(4, "nan", "inf", skipped=1, nonfinite_steps=1),
            {"step": 4, "grad_norm_by_layer": layers(2)},
            train_row(5, 0.4, 0.2, skipped=1, nonfinite_steps=1),
            {"step": 6, "eval_loss": "inf", "eval_tokens": 100},
            {"step": 6, "eval_loss": 0.6, "eval_tokens": 100},
            {"step": 6, "some_future_kind": 1},
        ],
    )
    (out / "plots").mkdir()
    (out / "plots" / "notes.txt").write_text("mine")

    written = plot_run(out)

    assert {p.name for p in written} == ALWAYS | {"grad_norm_by_layer.png"}
    for path in written:
        assert_readable_png(path)
    assert (out / "plots" / "notes.txt").read_text() == "mine"
    assert not list((out / "plots").glob("*.partial"))

    run = read_run(out)
    loss = run.series(run.train_rows, "loss")
    assert (loss.steps, loss.values, loss.nonfinite_steps) == ([1, 2, 3, 5], [8.0, 6.0, 5.0, 0.4], [4])
    held_out = run.series(run.eval_rows, "eval_loss")
    assert (held_out.steps, held_out.values) == ([3, 6], [5.5, 0.6]), "the last row of step 6 wins"
    norm = run.series(run.train_rows, "grad_norm")
    assert (norm.steps, norm.nonfinite_steps) == ([1, 3, 5], [4]), "null skipped, inf kept apart"
    assert run.increases("skipped_steps") == [4] and run.increases("nonfinite_steps") == [4]
    assert run.max_grad_norm == 0.5

    ax = Figure().add_subplot()
    draw_loss(ax, run)
    assert ax.get_yscale() == "log", "loss spans 0.4..8: more than a decade"
    assert all(math.isfinite(y) for line in ax.get_lines() for y in line.get_ydata())
    assert "1 non-finite value not drawn" in ax.get_title()


def test_mfu_and_memory_charts_where_the_run_logged_them(tmp_path: Path):
    """A GPU run's rows (mfu, peak memory per interval, and a row where one was not known) get two more charts."""

    def memory(allocated):
        return {"max_memory_allocated_gb": allocated, "max_memory_reserved_gb": allocated + 2.0}

    write_rows(
        tmp_path / "metrics.jsonl",
        [
            train_row(1, 3.0, 1.5, mfu=0.38, **memory(10.0)),
            train_row(2, 2.5, 1.2, mfu=0.41, **memory(12.5)),
            train_row(3, 2.0, 1.1),
            train_row(4, 1.8, 1.0, mfu=0.42, **memory(12.0)),
        ],
    )
    written = plot_run(tmp_path)
    assert {p.name for p in written} == ALWAYS | {"mfu.png", "memory.png"}
    for path in written:
        assert_readable_png(path)

    run = read_run(tmp_path)
    ax = Figure().add_subplot()
    draw_mfu(ax, run)
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [1, 2, 4] and list(line.get_ydata()) == pytest.approx([38.0, 41.0, 42.0])
    assert ax.get_title() == "Model FLOPs utilization (median 41.0%)" and ax.get_ylim()[0] == 0
    ax = Figure().add_subplot()
    draw_memory(ax, run)
    allocated, reserved = ax.get_lines()
    assert list(allocated.get_ydata()) == [10.0, 12.5, 12.0] and list(reserved.get_ydata()) == [12.0, 14.5, 14.0]
    assert "max 14.50 GiB" in ax.get_title()


@pytest.mark.parametrize(
    "config_yaml, expected",
    [
        ("train:\n  max_grad_norm: null\n", "no clipping (train.max_grad_norm = null)"),
        (None, "clip threshold unknown (no config.yaml)"),
    ],
)
def test_grad_norm_chart_without_a_clip_threshold(tmp_path: Path, config_yaml, expected):
    write_rows(tmp_path / "metrics.jsonl", [train_row(1, 3.0, 1.5), train_row(2, 2.0, 1.2)])
    if config_yaml is not None:
        (tmp_path / "config.yaml").write_text(config_yaml)
    ax = Figure().add_subplot()
    draw_grad_norm(ax, read_run(tmp_path))
    assert expected in ax.get_title()
    assert not [line for line in ax.get_lines() if "clip threshold" in str(line.get_label())]
    assert len(plot_run(tmp_path)) == len(ALWAYS)


def test_a_half_written_last_line_of_a_live_run_is_ignored(tmp_path: Path):
    write_rows(tmp_path / "metrics.jsonl", [train_row(1, 3.0, 1.5)], tail='{"step": 2, "loss": 2.')
    run = read_run(tmp_path)
    assert run.series(run.train_rows, "loss").steps == [1]


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing dir", "output_dir '{out}' not found; pass the output_dir of a run (it holds metrics.jsonl)"),
        ("missing metrics", "'{out}/metrics.jsonl' not found"),
        ("corrupt line", "{out}/metrics.jsonl:2: not valid JSON"),
        ("not an object", "{out}/metrics.jsonl:1: not a metrics row"),
        ("no training rows", "'{out}/metrics.jsonl' has no training rows yet"),
        ("not a number", "{out}/metrics.jsonl:2: loss is 'lots', not a number"),
    ],
)
def test_bad_input_is_one_usage_error_naming_the_file(tmp_path: Path, case: str, expected: str):
    out = tmp_path / "run"
    if case != "missing dir":
        out.mkdir()
    rows = {
        "corrupt line": [train_row(1, 3.0, 1.0), '{"step": 2, "loss": 2.0', train_row(3, 1.0, 1.0)],
        "not an object": ["[1, 2]", train_row(1, 3.0, 1.0)],
        "no training rows": [{"step": 0, "eval_loss": 5.0, "eval_tokens": 10}],
        "not a number": [train_row(1, 3.0, 1.0), train_row(2, "lots", 1.0)],
    }.get(case)
    if rows is not None:
        write_rows(out / "metrics.jsonl", rows)
    with pytest.raises(UsageError) as caught:
        plot_run(out)
    assert len(caught.value.lines) == 1
    assert expected.format(out=out) in caught.value.lines[0]
    assert not (out / "plots").exists(), "nothing written on bad input"
