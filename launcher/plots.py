"""Charts of a finished or running run: OUTPUT_DIR/metrics.jsonl drawn as PNGs in OUTPUT_DIR/plots/."""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

from launcher.config import TrainConfig
from launcher.errors import UsageError

PLOTS_DIR = "plots"
DPI = 110
CHART_SIZE_IN = (8.0, 4.8)
OVERVIEW_SIZE_IN = (14.0, 9.0)
LOG_SCALE_SPAN = 10.0  # a log y axis once the drawn values span more than one decade


@dataclass
class Series:
    """One quantity against optimizer step. Non-finite values cannot be drawn on a y axis (and break a log
    scale), so they are kept apart and shown as markers at their step."""

    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    nonfinite_steps: list[int] = field(default_factory=list)


@dataclass
class RunMetrics:
    """metrics.jsonl split by kind of row, each sorted by step with the last row kept for a repeated step."""

    path: Path
    train_rows: list[tuple[int, dict]]  # (line number, row) of rows with "loss"
    eval_rows: list[tuple[int, dict]]  # rows with "eval_loss"
    layer_rows: list[tuple[int, dict]]  # rows with "grad_norm_by_layer"
    max_grad_norm: float | None  # the clip threshold; None: no clipping, or unknown
    clipping_known: bool  # False when there is no config.yaml to say
    grad_norm_type: float

    def series(self, rows: list[tuple[int, dict]], key: str) -> Series:
        """`key` of each row that has it; a null value (e.g. grad_norm on a step that did not measure it) is skipped."""
        out = Series()
        for line_no, row in rows:
            if row.get(key) is None:
                continue
            value = _number(row[key], self.path, line_no, key)
            if math.isfinite(value):
                out.steps.append(row["step"])
                out.values.append(value)
            else:
                out.nonfinite_steps.append(row["step"])
        return out

    def increases(self, key: str) -> list[int]:
        """Steps of training rows where a running counter (skipped_steps, nonfinite_steps) went up since the row before."""
        steps, previous = [], 0.0
        for line_no, row in self.train_rows:
            if row.get(key) is None:
                continue
            value = _number(row[key], self.path, line_no, key)
            if value > previous:
                steps.append(row["step"])
            previous = value
        return steps


def plot_run(output_dir: Path) -> list[Path]:
    """Draw a run's metrics as PNGs in `output_dir`/plots/ and return their paths.

    Reads `output_dir`/metrics.jsonl and, for the clip threshold, `output_dir`/config.yaml. Writes loss.png
    (train and eval loss), lr.png, grad_norm.png (pre-clip norm and the train.max_grad_norm line),
    throughput.png, overview.png (those four on one page) and, when the run logged them, mfu.png (model FLOPs
    utilization), memory.png (peak GPU memory per log interval) and grad_norm_by_layer.png. Works on a run still in progress. Writes nothing outside plots/ and replaces
    only these PNGs there.

    Raises UsageError when output_dir or metrics.jsonl is missing, a line of metrics.jsonl is not a JSON
    object with a step, or there is no training row yet.
    """
    output_dir = Path(output_dir)
    run = read_run(output_dir)
    figures = {
        "loss.png": single_chart(draw_loss, run),
        "lr.png": single_chart(draw_lr, run),
        "grad_norm.png": single_chart(draw_grad_norm, run),
        "throughput.png": single_chart(draw_throughput, run),
        "overview.png": overview(run, title=str(output_dir)),
    }
    if run.series(run.train_rows, "mfu").steps:
        figures["mfu.png"] = single_chart(draw_mfu, run)
    if run.series(run.train_rows, "max_memory_allocated_gb").steps:
        figures["memory.png"] = single_chart(draw_memory, run)
    if run.layer_rows:
        figures["grad_norm_by_layer.png"] = layer_chart(run)
    plots_dir = output_dir / PLOTS_DIR
    if plots_dir.exists() and not plots_dir.is_dir():
        raise UsageError(f"'{plots_dir}' is a file; move it aside so the charts can go in a {PLOTS_DIR}/ folder there")
    plots_dir.mkdir(exist_ok=True)
    return [save_png(figure, plots_dir / name) for name, figure in figures.items()]


def read_run(output_dir: Path) -> RunMetrics:
    """metrics.jsonl by kind of row, and the clipping settings from config.yaml."""
    if not output_dir.is_dir():
        raise UsageError(f"output_dir '{output_dir}' not found; pass the output_dir of a run (it holds metrics.jsonl)")
    path = output_dir / "metrics.jsonl"
    if not path.is_file():
        raise UsageError(f"'{path}' not found; pass the output_dir of a run that has started training (it writes metrics.jsonl)")
    by_kind: dict[str, dict[int, tuple[int, dict]]] = {"loss": {}, "eval_loss": {}, "grad_norm_by_layer": {}}
    text = path.read_text()
    lines = text.splitlines()
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            # a live run may be halfway through writing its last line: that line is not an error yet
            if line_no == len(lines) and not text.endswith("\n"):
                break
            raise UsageError(f"{path}:{line_no}: not valid JSON ({err.msg}); fix or delete that line") from None
        step = row.get("step") if isinstance(row, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            raise UsageError(f"{path}:{line_no}: not a metrics row (a JSON object with an integer step); fix or delete that line")
        if not isinstance(row.get("grad_norm_by_layer", {}), dict):
            raise UsageError(f"{path}:{line_no}: grad_norm_by_layer is not an object of layer name to norm; fix or delete it")
        for kind, rows in by_kind.items():
            if kind in row:
                rows[step] = (line_no, row)  # a repeated step (e.g. a resume that re-logged it): the last row wins
    if not by_kind["loss"]:
        raise UsageError(f"'{path}' has no training rows yet; plot again after the first train.log_every steps")
    ordered = {kind: [rows[step] for step in sorted(rows)] for kind, rows in by_kind.items()}
    max_grad_norm, clipping_known, grad_norm_type = read_clipping(output_dir / "config.yaml")
    return RunMetrics(path, ordered["loss"], ordered["eval_loss"], ordered["grad_norm_by_layer"], max_grad_norm, clipping_known, grad_norm_type)


def read_clipping(path: Path) -> tuple[float | None, bool, float]:
    """(train.max_grad_norm, whether it is known, train.grad_norm_type) from a run's config.yaml. Read as plain
    YAML rather than through load_config: a run's data file may have moved since, and that must not stop a plot.
    A key the file lacks has the value a run would have used: the config default."""
    defaults = TrainConfig.model_fields
    if not path.is_file():
        return None, False, defaults["grad_norm_type"].default
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UsageError(f"{path}: not valid YAML ({err}); fix it or move it aside to plot without the clip threshold") from None
    train = raw.get("train") if isinstance(raw, dict) else None
    train = train if isinstance(train, dict) else {}
    max_grad_norm = train.get("max_grad_norm", defaults["max_grad_norm"].default)
    norm_type = train.get("grad_norm_type", defaults["grad_norm_type"].default)
    for key, value in (("max_grad_norm", max_grad_norm), ("grad_norm_type", norm_type)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise UsageError(f"{path}: train.{key} is {value!r}, not a number; fix it or move the file aside")
    return (None if max_grad_norm is None else float(max_grad_norm)), True, float(norm_type)


def _number(value, path: Path, line_no: int, key: str) -> float:
    """A metrics value as a float; metrics.jsonl writes non-finite floats as the strings "nan", "inf", "-inf"."""
    if not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    raise UsageError(f"{path}:{line_no}: {key} is {value!r}, not a number; fix or delete that line")


# ---- one function per chart, each drawing on a given Axes so the overview reuses them ----


def draw_loss(ax: Axes, run: RunMetrics, compact: bool = False) -> None:
    train = run.series(run.train_rows, "loss")
    held_out = run.series(run.eval_rows, "eval_loss")
    ax.plot(train.steps, train.values, color="C0", marker=few_points_marker(train), label="train (mean over each log interval)")
    if held_out.steps:
        ax.plot(held_out.steps, held_out.values, "o-", color="C1", markersize=5, label="eval (held-out split)")
    log_scale_if_wide(ax, train.values + held_out.values)
    nonfinite = train.nonfinite_steps + held_out.nonfinite_steps
    mark_steps(ax, nonfinite, "non-finite loss (not drawn)", marker="x", color="red")
    finish(ax, "Loss" + drawn_note(nonfinite), "loss (nats/token)", compact)


def draw_lr(ax: Axes, run: RunMetrics, compact: bool = False) -> None:
    lr = run.series(run.train_rows, "lr")
    ax.plot(lr.steps, lr.values, color="C2", marker=few_points_marker(lr), label="learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.set_ylim(bottom=0)
    finish(ax, "Learning rate (the value each logged step used)", "learning rate", compact, legend=False)


def draw_grad_norm(ax: Axes, run: RunMetrics, compact: bool = False) -> None:
    norm = run.series(run.train_rows, "grad_norm")
    ax.plot(norm.steps, norm.values, color="C3", marker=few_points_marker(norm), label="gradient norm before clipping")
    if run.max_grad_norm is not None:
        ax.axhline(
            run.max_grad_norm, color="black", linestyle="--", linewidth=1.2, label=f"clip threshold (train.max_grad_norm = {run.max_grad_norm:g})"
        )
        n_clipped = sum(value > run.max_grad_norm for value in norm.values)
        clipping = f" ({n_clipped} of {len(norm.values)} logged steps clipped)"
    elif run.clipping_known:
        clipping = ", no clipping (train.max_grad_norm = null)"
    else:
        clipping = ", clip threshold unknown (no config.yaml)"
    log_scale_if_wide(ax, norm.values + ([run.max_grad_norm] if run.max_grad_norm else []))
    mark_steps(ax, norm.nonfinite_steps, "non-finite norm (not drawn)", marker="x", color="red")
    # counters of the whole run so far: a marker where one went up since the previous logged row
    mark_steps(ax, run.increases("skipped_steps"), "optimizer step skipped (skipped_steps went up)", marker="v", color="purple", height=0.90)
    mark_steps(ax, run.increases("nonfinite_steps"), "non-finite step (nonfinite_steps went up)", marker="v", color="orange", height=0.84)
    finish(
        ax,
        "Gradient norm before clipping" + clipping + drawn_note(norm.nonfinite_steps),
        f"total gradient norm ({norm_name(run.grad_norm_type)})",
        compact,
    )


def draw_throughput(ax: Axes, run: RunMetrics, compact: bool = False) -> None:
    tokens = run.series(run.train_rows, "tokens_per_s")
    step_time = run.series(run.train_rows, "s_per_step")
    ax.plot(tokens.steps, tokens.values, color="C4", marker=few_points_marker(tokens), label="tokens/s")
    if tokens.values:  # from zero, so ordinary jitter does not look like a collapse
        ax.set_ylim(0, 1.1 * max(tokens.values))
    ax.yaxis.set_major_formatter(lambda value, _: f"{value:,.0f}")
    # s/step is ~ 1 / tokens/s at a fixed batch: a second axis would repeat the curve, so its median goes in the title
    medians = []
    if tokens.values:
        medians.append(f"median {statistics.median(tokens.values):,.0f} tokens/s")
    if step_time.values:
        medians.append(f"{statistics.median(step_time.values):.3g} s/step")
    finish(ax, "Throughput" + (f" ({', '.join(medians)})" if medians else ""), "target tokens/s (all ranks)", compact, legend=False)


def draw_mfu(ax: Axes, run: RunMetrics, compact: bool = False) -> None:
    mfu = run.series(run.train_rows, "mfu")
    percent = [100 * v for v in mfu.values]
    ax.plot(mfu.steps, percent, color="C5", marker=few_points_marker(mfu), label="MFU")
    ax.set_ylim(0, 1.1 * max(percent))  # from zero, as throughput: ordinary jitter must not look like a collapse
    median = f" (median {statistics.median(percent):.1f}%)"
    finish(ax, "Model FLOPs utilization" + median, "achieved / peak dense FLOP/s (%)", compact, legend=False)


def draw_memory(ax: Axes, run: RunMetrics, compact: bool = False) -> None:
    allocated = run.series(run.train_rows, "max_memory_allocated_gb")
    reserved = run.series(run.train_rows, "max_memory_reserved_gb")
    ax.plot(allocated.steps, allocated.values, color="C6", marker=few_points_marker(allocated), label="peak allocated (tensors)")
    ax.plot(
        reserved.steps,
        reserved.values,
        color="C7",
        linestyle="--",
        marker=few_points_marker(reserved),
        label="peak reserved (the caching allocator's pool)",
    )
    ax.set_ylim(0, 1.1 * max(allocated.values + reserved.values))
    finish(ax, f"Peak GPU memory per log interval, main process (max {max(allocated.values + reserved.values):.2f} GiB)", "GiB", compact)


def layer_chart(run: RunMetrics) -> Figure:
    """One line per layer. Layers keep their order in the model and take colours along it, so with many
    layers depth reads as a gradient rather than a legend lookup."""
    names = list(dict.fromkeys(name for _, row in run.layer_rows for name in row["grad_norm_by_layer"]))
    flat = [(line_no, {**row["grad_norm_by_layer"], "step": row["step"]}) for line_no, row in run.layer_rows]
    colors = colormaps["viridis"].resampled(max(len(names), 2))
    legend_columns = math.ceil(len(names) / 24)
    figure = Figure(figsize=(CHART_SIZE_IN[0] + (2.2 * legend_columns if len(names) > 8 else 0), CHART_SIZE_IN[1]), layout="constrained")
    ax = figure.add_subplot()
    drawn, nonfinite = [], []
    for i, name in enumerate(names):
        norm = run.series(flat, name)
        ax.plot(norm.steps, norm.values, color=colors(i), label=name, marker=few_points_marker(norm))
        drawn += norm.values
        nonfinite += norm.nonfinite_steps
    log_scale_if_wide(ax, drawn)
    mark_steps(ax, sorted(set(nonfinite)), "non-finite norm (not drawn)", marker="x", color="red")
    finish(
        ax,
        "Gradient norm by layer, before clipping" + drawn_note(nonfinite),
        f"gradient norm ({norm_name(run.grad_norm_type)})",
        compact=False,
        legend=False,
    )
    if len(names) > 8:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", ncols=legend_columns, frameon=False)
    else:
        ax.legend(fontsize="small")
    return figure


def single_chart(draw, run: RunMetrics) -> Figure:
    # Figure without pyplot: no global backend or figure registry, so plotting inside a training process is safe
    figure = Figure(figsize=CHART_SIZE_IN, layout="constrained")
    draw(figure.add_subplot(), run)
    return figure


def overview(run: RunMetrics, title: str) -> Figure:
    figure = Figure(figsize=OVERVIEW_SIZE_IN, layout="constrained")
    axes = figure.subplots(2, 2).flatten()
    for ax, draw in zip(axes, (draw_loss, draw_lr, draw_grad_norm, draw_throughput)):
        draw(ax, run, compact=True)
    figure.suptitle(title)
    return figure


def finish(ax: Axes, title: str, ylabel: str, compact: bool, legend: bool = True) -> None:
    ax.set_title(title, fontsize="medium" if compact else "large")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # a short run would otherwise get steps like 2.5
    ax.grid(True, which="major", alpha=0.4)
    ax.grid(True, which="minor", alpha=0.15)
    if legend:
        ax.legend(fontsize="small" if compact else "medium")


def mark_steps(ax: Axes, steps: list[int], label: str, marker: str, color: str, height: float = 0.96) -> None:
    """Events without a y value (a nan loss, a skipped step) as markers near the top edge, at their step;
    `height` (a fraction of the axes) keeps kinds of event that share a step apart. Call it once the data and
    the y scale are drawn: it places the markers in data units (so the legend's "best" place avoids them)
    and then holds the y range where the data put it."""
    if not steps:
        return
    low, high = ax.get_ylim()
    y = ax.transData.inverted().transform(ax.transAxes.transform((0, height)))[1]
    ax.plot(steps, [y] * len(steps), linestyle="none", marker=marker, color=color, markersize=7, label=label, zorder=3)
    ax.set_ylim(low, high)


def few_points_marker(series: Series) -> str | None:
    """Dots on a short series, where a bare line hides which steps were logged; none on a long one."""
    return "." if len(series.steps) < 30 else None


def log_scale_if_wide(ax: Axes, values: list[float]) -> None:
    positive = [v for v in values if v > 0]
    if positive and len(positive) == len(values) and max(positive) / min(positive) > LOG_SCALE_SPAN:
        ax.set_yscale("log")
        # plain numbers ("0.5", "2") instead of 5x10^-1; minor ticks only labelled while few decades show
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        few_decades = max(positive) / min(positive) < 1000
        ax.yaxis.set_minor_formatter(FuncFormatter(label_2_and_5) if few_decades else NullFormatter())


def label_2_and_5(value: float, _) -> str:
    """A minor log tick's label at 2 and 5 times a power of ten (enough to read a value off), else none."""
    mantissa = value / 10 ** math.floor(math.log10(value))
    return f"{value:g}" if any(abs(mantissa - m) < 1e-6 for m in (2, 5)) else ""


def drawn_note(nonfinite_steps: list[int]) -> str:
    n = len(nonfinite_steps)
    return f"\n{n} non-finite value{'s' if n != 1 else ''} not drawn (x at the top)" if n else ""


def norm_name(norm_type: float) -> str:
    return "L2" if norm_type == 2 else "max |g|" if math.isinf(norm_type) else f"L{norm_type:g}"


def save_png(figure: Figure, path: Path) -> Path:
    """Write through a temporary name, so a viewer refreshing the file never reads half a PNG."""
    partial = path.with_name(path.name + ".partial")
    figure.savefig(partial, format="png", dpi=DPI)
    os.replace(partial, path)
    return path
