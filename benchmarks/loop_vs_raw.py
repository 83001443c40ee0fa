"""Throughput of the launcher's loop against a hand-written PyTorch loop: same model, weights and batches.

Both sides train the built-in GPT from the same seed on the same batches in the same order, with
AdamW (launcher.optim groups), the same LR schedule, 2 micro-steps of accumulation normalized by
the step's target tokens, clipping at 1.0 and zero_grad(set_to_none=True). The raw loop is a best
case: its batches are materialized on the device before timing and it has no Accelerate. The
launcher side runs its real pipeline: build_run (untimed setup, once) then train() (timed). Each
side is built once and warmed up by one untimed round (torch.compile pays its compilation there),
then rounds of the same steps alternate raw/launcher (7 by default), and the median of each side is
reported with the spread (min, median, max per side, and of the per-round ratio): steady-state
throughput, as a long run sees it, and how far one round can be from it. MFU is the same model FLOPs
per token (launcher.flops) over the device's dense peak, for both sides.

Run from the repository root:
  .venv/bin/python benchmarks/loop_vs_raw.py                                   # CPU, tiny (configs/default.yaml model)
  .venv/bin/python benchmarks/loop_vs_raw.py --steps 40 --rounds 3
  .venv/bin/python benchmarks/loop_vs_raw.py --device cuda --mixed-precision bf16 --preset gpt2-small
  .venv/bin/python benchmarks/loop_vs_raw.py --device cuda --mixed-precision bf16 --preset gpt2-small --compile
  .venv/bin/python benchmarks/loop_vs_raw.py --device cuda --mixed-precision bf16 --preset gpt2-small --compile \
      --micro-batch-size 16 --accumulation-steps 4 --steps 20
  .venv/bin/python benchmarks/loop_vs_raw.py --peak-tflops 0.2         # MFU on a CPU against a peak you state
On a CPU shared with other jobs, OMP_NUM_THREADS=1 in front keeps a busy neighbour from stalling
both sides' thread pools (the rounds then vary less).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from launcher.bare_model import build_bare_model
from launcher.build import build_run
from launcher.config import load_config
from launcher.data import IGNORE_INDEX
from launcher.flops import flops_per_token, matmul_dtype, peak_tflops
from launcher.loop import train
from launcher.metrics import read_metrics
from launcher.optim import build_lr_schedule, build_optimizer

REPO = Path(__file__).resolve().parents[1]
PRESETS = {
    "tiny": [],  # configs/default.yaml as shipped: 4 layers, 4 heads, d_model 128, seq_len 128, micro-batch 8
    "gpt2-small": ["model.n_layer=12", "model.n_head=12", "model.d_model=768", "data.seq_len=1024", "train.micro_batch_size=8"],
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model on both sides")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--steps", type=int, default=40, help="timed optimizer steps per round and side")
    parser.add_argument("--rounds", type=int, default=7, help="raw/launcher pairs; the median of each side is reported")
    parser.add_argument("--micro-batch-size", type=int, help="samples per micro-step (default: the preset's)")
    parser.add_argument("--accumulation-steps", type=int, default=2, help="micro-steps per optimizer step")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the timed rounds, profile one more round per side and print the top operators and the host-device syncs of each",
    )
    parser.add_argument("--peak-tflops", type=float, help="dense peak TFLOP/s of the device for MFU (default: the table in launcher/flops.py)")
    parser.add_argument("--log-every", type=int, default=50, help="steps between loss reads (host-device syncs), both sides")
    args = parser.parse_args()
    if args.mixed_precision == "fp16" and args.device != "cuda":
        parser.error("--mixed-precision fp16 needs --device cuda (its loss scaler is GPU-only)")
    return args


def make_config(args: argparse.Namespace, output_dir: Path, max_steps: int):
    return load_config(
        REPO / "configs" / "default.yaml",
        PRESETS[args.preset]
        + [
            f"output_dir={output_dir}",
            f"train.max_steps={max_steps}",
            "train.epochs=null",
            f"train.mixed_precision='{args.mixed_precision}'",
            f"train.compile={str(args.compile).lower()}",
            f"train.gradient_accumulation_steps={args.accumulation_steps}",
            "train.max_grad_norm=1.0",
            f"train.log_every={args.log_every}",
            "data.eval_fraction=0",  # no held-out split, so no evaluation: the loop alone is timed
        ]
        + ([f"train.micro_batch_size={args.micro_batch_size}"] if args.micro_batch_size else [])
        + ([f"train.peak_tflops={args.peak_tflops}"] if args.peak_tflops else []),
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":  # kernels are asynchronous: the clock must wait for them
        torch.cuda.synchronize(device)


class LauncherSide:
    """build_run once (untimed); each round is one train() over the same steps, which continues from the
    current weights exactly as the raw side does."""

    def __init__(self, args: argparse.Namespace, output_dir: Path):
        with contextlib.redirect_stdout(io.StringIO()):  # build_run prints the parameter table
            self.run = build_run(make_config(args, output_dir, args.steps), overwrite=True)

    def round(self) -> float:
        """Seconds of the training steps of one train(), as the loop itself timed them.

        train() also evaluates (off here) and writes the final weights (0.5 GB for gpt2-small); the
        metrics rows' s_per_step covers exactly the steps: from before the first step to the host-device
        sync that reads the loss, like the raw side's clock.
        """
        metrics_path = self.run.cfg.output_dir / "metrics.jsonl"
        rows_before = len(read_metrics(metrics_path)) if metrics_path.exists() else 0
        with contextlib.redirect_stdout(io.StringIO()):  # its mfu note and progress lines, every round
            self.summary = train(self.run)
        rows = [r for r in read_metrics(metrics_path)[rows_before:] if "s_per_step" in r]
        steps = [0] + [r["step"] for r in rows]
        return sum(r["s_per_step"] * (step - prev) for r, prev, step in zip(rows, steps, steps[1:]))

    def weights(self) -> dict[str, torch.Tensor]:
        return load_file(self.summary["weights"])


def materialize(train_data, steps: int, device: torch.device) -> list[tuple[list, int]]:
    """The launcher's micro-batches for steps 0..steps-1, copied to the device now (outside any timing)."""
    windows = [train_data.window(step) for step in range(steps)]
    batches = [([micro.to(device) for micro in w.micro_batches], w.global_target_tokens) for w in windows]
    synchronize(device)
    return batches


class RawSide:
    """A hand-written loop over pre-materialized batches: autocast, backward, clip, step, schedule."""

    def __init__(self, args: argparse.Namespace, batches: list, device: torch.device):
        self.args, self.batches, self.device = args, batches, device
        cfg = make_config(args, Path("unused"), len(batches))  # the raw loop writes nothing
        self.max_grad_norm = cfg.train.max_grad_norm
        self.model, _ = build_bare_model(cfg)  # same seed and frozen parameters as build_run
        self.model.to(device)
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.lr_schedule = build_lr_schedule(self.optimizer, cfg.train, len(batches))
        self.forward = torch.compile(self.model) if args.compile else self.model  # as Accelerate's dynamo_backend
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
        self.scaler = torch.amp.GradScaler(device.type) if args.mixed_precision == "fp16" else None

    def round(self) -> float:
        model, optimizer, scaler, device = self.model, self.optimizer, self.scaler, self.device
        loss_sum_total = torch.zeros((), dtype=torch.float64, device=device)
        model.train()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        started_s = time.perf_counter()
        for step, (micro_batches, global_target_tokens) in enumerate(self.batches):
            for micro in micro_batches:
                # autocast around the forward only, as Accelerate wraps model.forward; the loss in fp32
                with torch.autocast(device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext():
                    logits = self.forward(micro.input_ids)
                loss_sum = F.cross_entropy(logits.float().flatten(0, 1), micro.labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
                # times the reciprocal, as the launcher's scale does: the gradients match it bit for bit
                loss = loss_sum * (1.0 / global_target_tokens)
                (scaler.scale(loss) if scaler else loss).backward()
                loss_sum_total += loss_sum.detach()
            if scaler:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            if scaler:  # best case: the schedule steps even when the scaler skipped the step (no check at all)
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            self.lr_schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if (step + 1) % self.args.log_every == 0 or step + 1 == len(self.batches):
                loss_sum_total.item()  # the one host-device sync per log interval, as the launcher's metrics row
        synchronize(device)
        return time.perf_counter() - started_s


def profile_round(name: str, side, device: torch.device) -> None:
    """One more round under torch.profiler: the operators with the most self time on the device (CPU: on the host),
    and how often the host waited for the device. The launcher's round also writes its final weights (copies to
    the host), which the raw side does not."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        side.round()
    events = prof.key_averages()
    # the CUDA runtime calls in which the host waits (an .item() on a CUDA tensor is a cudaStreamSynchronize)
    syncs = {e.key: e.count for e in events if "Synchronize" in e.key} if cuda else "not recorded on CPU"
    print(f"\n== profile of one {name} round; host waits for the device: {syncs or 'none'}")
    print(events.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=15))


def main() -> None:
    args = parse_args()
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"  # the launcher picks CUDA whenever it is available otherwise
    else:  # TF32 matmuls on both sides (the launcher runs in this process)
        torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device(args.device)
    tmp_root = tempfile.TemporaryDirectory()
    launcher = LauncherSide(args, Path(tmp_root.name) / "launcher")
    cfg, plan = launcher.run.cfg, launcher.run.plan
    # the launcher's own batch schedule, copied to the device for the raw side
    batches = materialize(launcher.run.train_data, args.steps, device)
    target_tokens = sum(tokens for _, tokens in batches)
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device {device} ({hardware}), torch {torch.__version__}")
    print(
        f"preset {args.preset}: {cfg.model.n_layer} layers, {cfg.model.n_head} heads, d_model {cfg.model.d_model},"
        f" seq_len {cfg.data.seq_len}; {plan.describe()}; mixed precision {args.mixed_precision},"
        f" compile {args.compile}; {args.steps} steps x {args.rounds} rounds, log every {args.log_every}"
    )

    raw = RawSide(args, batches, device)
    raw.round()  # warm-up: compilation, allocator, thread pools
    launcher.round()
    raw_s, launcher_s = [], []
    for _ in range(args.rounds):
        raw_s.append(raw.round())
        launcher_s.append(launcher.round())

    per_token = flops_per_token(raw.model, cfg.data.seq_len)
    if args.peak_tflops:
        peak, peak_source = args.peak_tflops, "--peak-tflops"
    else:
        peak, peak_source = peak_tflops(device, matmul_dtype(raw.model, args.mixed_precision))
    mfu = (lambda seconds: target_tokens / seconds * per_token / (peak * 1e12)) if peak else None
    print(
        f"model FLOPs {per_token / 1e6:,.1f} M per token (launcher.flops); peak: "
        + (f"{peak:g} TFLOP/s ({peak_source})" if peak else f"none ({peak_source}; pass --peak-tflops for MFU)")
    )
    print(
        f"\n{'side':<10} {'tokens/s':>10} {'min':>10} {'max':>10} {'s/step':>8} {'MFU':>7} {'MFU min..max':>14}"
        f"   (median of {args.rounds} rounds; target tokens)"
    )
    for side, times in (("raw", raw_s), ("launcher", launcher_s)):
        median_s = statistics.median(times)
        spread = f"{100 * mfu(max(times)):.1f}..{100 * mfu(min(times)):.1f}%" if mfu else "-"
        print(
            f"{side:<10} {target_tokens / median_s:>10,.0f} {target_tokens / max(times):>10,.0f} {target_tokens / min(times):>10,.0f}"
            f" {median_s / args.steps:>8.4f} {f'{100 * mfu(median_s):.1f}%' if mfu else '-':>7} {spread:>14}"
        )
        print(f"{'':<10} rounds: " + " ".join(f"{t:.3f}s" for t in times))
    ratios = sorted(raw / ours for raw, ours in zip(raw_s, launcher_s))  # > 1: the launcher was faster in that round
    print(f"launcher/raw = {statistics.median(raw_s) / statistics.median(launcher_s):.3f}x (ratio of the medians)")
    print(f"  per round: min {ratios[0]:.3f}x, median {statistics.median(ratios):.3f}x, max {ratios[-1]:.3f}x")
    # on a shared machine a busy neighbour slows whole rounds; the best rounds are the least disturbed
    print(f"  best round vs best round: {min(raw_s) / min(launcher_s):.3f}x")
    if args.compile:  # expected: one graph per side or one shared (the forwards trace alike in fp32), no graph break
        from torch._dynamo.utils import counters

        graphs = counters["stats"]["unique_graphs"]
        print(
            f"torch.compile: {graphs} graph{'s' if graphs != 1 else ''} compiled for both sides together,"
            f" {sum(counters['graph_break'].values())} graph breaks"
        )
    if args.profile:
        for name, side in (("raw", raw), ("launcher", launcher)):
            profile_round(name, side, device)
    # both sides should have done the same work: exact on CPU in fp32, close elsewhere
    raw_weights = raw.model.state_dict()
    max_diff = max((raw_weights[name].float().cpu() - w.float()).abs().max().item() for name, w in launcher.weights().items())
    print(f"final weights, max |launcher - raw| = {max_diff:.3g}")
    tmp_root.cleanup()


if __name__ == "__main__":
    main()
