"""`launcher train|inspect|plan|preview|tokenize CONFIG [key=value ...]`, `launcher plot OUTPUT_DIR`, `launcher make-tiny-model DIR`:
parse, build, run. Bad input: one line per problem, exit 2."""

from __future__ import annotations

import argparse
import json
import os
import sys

from launcher.errors import RunFault, UsageError
from launcher.exits import EXIT_OK, end_with_error

# The commands import what they need inside: a refused command answers before torch and the libraries load (seconds),
# and the stop-signal handler is installed before anything slow.


def build_parser() -> argparse.ArgumentParser:
    """Every command, argument and flag of `launcher` (docs/reference/cli.md is generated from it)."""
    parser = argparse.ArgumentParser(prog="launcher", description="Exact, fast training from one GPU to many nodes.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train from a YAML config")
    train.add_argument("config", help="YAML config file, e.g. configs/default.yaml")
    train.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.max_steps=100")
    train.add_argument("--overwrite", action="store_true", help="replace the run in an existing non-empty output_dir")
    debugging = train.add_argument_group("debugging (each flag is a config key, recorded in config.yaml)")
    debugging.add_argument(
        "--debug",
        action="store_true",
        help="one process, --debug-steps steps, deterministic, checked after every step, a summary; into OUTPUT_DIR-debug",
    )
    debugging.add_argument("--debug-steps", type=int, default=10, metavar="N", help="steps of a --debug run (default 10)")
    debugging.add_argument("--detect-anomaly", action="store_true", help="diagnostics.detect_anomaly: name the backward op that made a nan (slow)")
    debugging.add_argument("--overfit-batches", type=int, metavar="N", help="train.overfit_batches: train on the first N steps' batches only")
    debugging.add_argument(
        "--simulate-world-size",
        type=int,
        metavar="N",
        help="launch.simulate_world_size: one process reproduces an N-process run's global batch and updates",
    )
    debugging.add_argument(
        "--dump-grad",
        action="append",
        default=[],
        metavar="NAME",
        help="diagnostics.dump_grad: print this parameter's gradient statistics (repeatable)",
    )
    debugging.add_argument("--dump-grad-steps", metavar="S1,S2,...", help="diagnostics.dump_grad_steps: at these steps (default: every log step)")
    inspect = commands.add_parser("inspect", help="list every parameter, its shape and whether it trains (no training)")
    inspect.add_argument("config", help="YAML config file")
    inspect.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. freeze=[blocks.0.*]")
    plan = commands.add_parser("plan", help="what a run will do: batches, steps, frozen parameters, DeepSpeed config, checkpoints, commands")
    plan.add_argument("config", help="YAML config file")
    plan.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    plan.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    plan.add_argument("--gpus-per-node", type=int, help="processes per node (default: launch.nproc_per_node)")
    plan.add_argument("--deepspeed", help="a DeepSpeed JSON (the same as deepspeed=JSON)")
    plan.add_argument(
        "--compare-backends", action="store_true", help="per-rank bytes of parameters, gradients and optimizer state under DDP, ZeRO-1/2/3 and FSDP2"
    )
    plan.add_argument("--time-limit", help="the SLURM time limit, HH:MM:SS")
    plan.add_argument("--step-time-s", type=float, help="estimated seconds per optimizer step")
    plan.add_argument("--cpus-per-task", type=int, help="CPUs per node for the sbatch line (default: --exclusive, whole nodes)")
    plan.add_argument("--mem", help="memory per node for the sbatch line, e.g. 200G (default: 0, all of it)")
    preview = commands.add_parser("preview", help="the first samples as the model sees them: trained tokens marked, rows, cuts, counts")
    preview.add_argument("config", help="YAML config file")
    preview.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    preview.add_argument("--n", type=int, default=5, help="samples to show (default 5)")
    preview.add_argument("--split", choices=["train", "eval"], default="train", help="the training or the evaluation samples (default train)")
    preview.add_argument("--ids", action="store_true", help="also print each sample's token ids")
    plan.add_argument("--json", action="store_true", help="the plan as one JSON object on stdout (for scripts and schedulers)")
    plan.add_argument("--gpu", help="check the peak against this GPU's memory: H100, H200, A100-40, A100-80, L40S, L4, A10, B200, ...")
    plan.add_argument("--gpu-memory-gb", type=float, help="check the peak against this many GB (10^9 bytes) per GPU")
    tiny = commands.add_parser("make-tiny-model", help="write a tiny Hugging Face model and tokenizer folder (for examples and tests; no download)")
    tiny.add_argument("output_dir", help="the folder to write (it must not exist)")
    tiny.add_argument("--arch", choices=["llama", "gpt2"], default="llama", help="llama (BOS added, pad token) or gpt2 (no BOS, no pad token)")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random initial weights")
    tokenize = commands.add_parser("tokenize", help="prepare a run's data as its own step (the cache a run reads), in parallel, resumable")
    tokenize.add_argument("config", help="YAML config file (the run's)")
    tokenize.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    tokenize.add_argument("--num-proc", type=int, metavar="N", help="processes (default: data.num_proc); rerun with the same N to resume")
    tokenize.add_argument("--tokens-out", metavar="DIR", help="also write the documents as token shards (data.format: tokens) under DIR")
    tokenize.add_argument("--shard-tokens", type=int, default=1 << 28, metavar="N", help="tokens per shard of --tokens-out (default 2^28)")
    plot = commands.add_parser("plot", help="PNG charts of a run's metrics.jsonl: losses, learning rate, grad norm, throughput")
    plot.add_argument("output_dir", help="the run's output_dir (it holds metrics.jsonl)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # overrides may also follow the flags (`train CONFIG --debug train.max_steps=20`): argparse ends a
    # positional list at the first flag, so what it leaves over are overrides too (checked by load_config)
    args, rest = parser.parse_known_args(argv)
    misplaced = [item for item in rest if item.startswith("-")] if hasattr(args, "overrides") else rest
    if misplaced:
        parser.error(f"unrecognized arguments: {' '.join(misplaced)}")
    if rest:
        args.overrides = args.overrides + rest
    if args.command in ("inspect", "plan", "plot", "make-tiny-model", "preview", "tokenize"):
        handlers = {
            "inspect": run_inspect,
            "plan": run_plan,
            "plot": run_plot,
            "make-tiny-model": run_make_tiny_model,
            "preview": run_preview,
            "tokenize": run_tokenize,
        }
        try:
            return handlers[args.command](args)
        except UsageError as err:
            return end_with_error(err)
    from launcher.preemption import PreemptionFlag

    # first of all: a preemption signal that arrives before the handler exists kills the process
    preemption = PreemptionFlag()
    from launcher.distributed import die_with_launcher, end_process, env_rank
    from launcher.local_launch import announce_to_parent, exit_code_for_parent, report_crash_to_parent

    die_with_launcher()
    announce_to_parent()
    try:
        code = run_train(args, argv, preemption)
    except UsageError as err:
        code = end_with_error(err, quiet=env_rank() != 0)  # every rank finds the same problem: one report
    except RunFault as err:  # the rank that met the fault reports it
        from launcher.metrics import close_progress_bars

        close_progress_bars()
        code = end_with_error(err, quiet=err.quiet)
    except Exception:  # a worker of a plain multi-process run: its parent says what happened (the process ends here)
        report_crash_to_parent()
        raise
    return end_process(exit_code_for_parent(code))  # the ranks end together (after a barrier, or on an input or fault every rank raised)


def run_preview(args: argparse.Namespace) -> int:
    from launcher.config import load_config
    from launcher.preview import preview

    cfg = load_config(args.config, args.overrides)
    colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    preview(cfg, args.n, args.split, args.ids, sys.stdout, colour)
    return EXIT_OK


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The debugging flags as the config keys they stand for (so config.yaml records them)."""
    overrides = []
    if args.detect_anomaly:
        overrides.append("diagnostics.detect_anomaly=true")
    if args.overfit_batches is not None:
        overrides.append(f"train.overfit_batches={args.overfit_batches}")
    if args.simulate_world_size is not None:  # one process by definition
        overrides += [f"launch.simulate_world_size={args.simulate_world_size}", "launch.nproc_per_node=1"]
    if args.dump_grad:
        overrides.append(f"diagnostics.dump_grad={json.dumps(args.dump_grad)}")
    if args.dump_grad_steps:
        overrides.append(f"diagnostics.dump_grad_steps=[{args.dump_grad_steps}]")
    return overrides


def run_train(args: argparse.Namespace, argv: list[str], preemption) -> int:
    from launcher.config import load_config
    from launcher.distributed import env_world_size, launched_by_a_launcher
    from launcher.library_output import keep_libraries_off_the_console
    from launcher.local_launch import processes_to_start
    from launcher.slurm import default_checkpoint_minutes, default_resume, restart_count

    keep_libraries_off_the_console()  # before torch and the libraries are imported: the console holds the launcher's lines
    cfg = load_config(args.config, args.overrides + flag_overrides(args), job_values=True)  # before torch is imported
    import torch

    from launcher.backends.fsdp2 import fsdp_from_accelerate

    cfg.fsdp = fsdp_from_accelerate(cfg.fsdp, cfg.deepspeed)  # accelerate launch --config_file configs/accelerate/fsdp2.yaml

    from launcher.lock import HANDOVER, OutputLock
    from launcher.resume import decide_start

    overwrite = args.overwrite
    if restart_count() >= 1 and overwrite and not args.debug:
        # the job's arguments are the same on every restart: deleting then would delete this job's own checkpoints
        overwrite = False
        if env_rank_is_main():
            print(
                f"--overwrite not applied: this is restart {restart_count()} of SLURM job {os.environ['SLURM_JOB_ID']}, which continues its own run"
            )
    if args.debug:
        from launcher.debug import start_debug_run

        cfg, overwrite = start_debug_run(cfg, args.debug_steps, env_world_size()), True  # replaces only a previous debug run
    if cfg.resume is None:
        cfg.resume = default_resume()  # "auto" for a restarted SLURM job only: it continues its own run
    if cfg.checkpoint.every_minutes is None:
        cfg.checkpoint.every_minutes = default_checkpoint_minutes()  # 30 inside a SLURM job
    nproc = processes_to_start(cfg.launch)
    warn_unapplied_process_count(cfg.launch)
    checked = None
    if launched_by_a_launcher():  # every process checks the input (build_run); the main process reports it and takes the lock
        start, lock = decide_start(cfg, overwrite, check_lock=env_world_size() == 1), OutputLock(cfg.output_dir)
    else:  # every problem of the input in one report, once, before any process starts
        start, checked, lock = preflight(cfg, overwrite, nproc)
    preemption.on_abort = lock.release  # a second Ctrl-C leaves output_dir free (nothing where this process holds nothing)
    if start.finished:
        lock.release()
        return report_finished(cfg)
    if not launched_by_a_launcher() and nproc > 1:
        from launcher.local_launch import relaunch

        if lock.held():  # the workers' main process takes it over: output_dir is held from the pre-flight to the end
            os.environ[HANDOVER] = json.dumps(lock.record)
        try:
            return relaunch(nproc, argv, preemption, cfg.distributed.timeout_s, cfg.output_dir)
        finally:
            lock.release()  # nothing once handed over; the lock of workers that never started

    from launcher.build import build_run
    from launcher.exits import end_run
    from launcher.hang import watch
    from launcher.loop import train

    torch.autograd.set_detect_anomaly(cfg.diagnostics.detect_anomaly)
    run = build_run(cfg, overwrite=overwrite, start=start, checked=checked, lock=lock)
    release_lock = run.lock.release if run.lock is not None else None
    watchdog = watch(run.model, cfg.distributed, cfg.output_dir, run.accelerator.process_index, run.accelerator.num_processes)
    try:
        if args.debug:
            from launcher.debug import open_debug_run, summary_text

            before = open_debug_run(run, args.debug_steps)
        summary = train(run, preemption)
        if watchdog is not None:
            watchdog.stop()  # the ranks end together from here on: no hang report
        if run.is_main_process:
            report(summary, cfg)
            if args.debug:
                print(summary_text(run, summary, before, cfg.diagnostics.detect_anomaly))
    except BaseException:
        if release_lock is not None:
            release_lock()
        raise
    code = end_run(summary, cfg.output_dir, run.is_main_process, release_lock)
    if code != EXIT_OK:
        run.accelerator.wait_for_everyone()  # no rank exits (failing the launch) before the main process is done
    return code


def warn_unapplied_process_count(launch) -> None:
    """Under accelerate launch, torchrun or SLURM the launcher chose the process count: a different
    launch.nproc_per_node in the config cannot take effect, so say so rather than ignore it."""
    local = os.environ.get("LOCAL_WORLD_SIZE")
    asked = launch.nproc_per_node
    if local is not None and isinstance(asked, int) and "nproc_per_node" in launch.model_fields_set and asked != int(local) and env_rank_is_main():
        print(f"launcher: warning: launch.nproc_per_node: {asked} not applied: the launcher that started this run gave {local} process(es) per node")


def env_rank_is_main() -> bool:
    from launcher.distributed import env_rank

    return env_rank() == 0


def report_finished(cfg) -> int:
    from launcher.final import describe

    print(
        f"output_dir '{cfg.output_dir}' holds this run, finished ({describe(cfg)}); nothing to do."
        f" Raise train.max_steps to train on from its last checkpoint, or set output_dir=NEW_DIR"
    )
    return EXIT_OK


def run_plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from launcher.plots import plot_run

    for path in plot_run(Path(args.output_dir)):
        print(path)
    return 0


def run_make_tiny_model(args: argparse.Namespace) -> int:
    from pathlib import Path

    from launcher.models.tiny import make_tiny_model

    out = Path(args.output_dir)
    if out.exists():
        raise UsageError(f"make-tiny-model: '{out}' already exists; give a new folder")
    try:
        import tokenizers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise UsageError("make-tiny-model: needs transformers and tokenizers; pip install -e '.[hf]' (or scripts/setup hf)") from None
    make_tiny_model(out, args.arch, args.seed)
    print(f"wrote {out}/: a tiny {args.arch}-style causal LM (bf16 weights) and its byte-level BPE tokenizer")
    return 0


def run_tokenize(args: argparse.Namespace) -> int:
    from pathlib import Path

    from launcher.config import load_config
    from launcher.data.tokenize import tokenize
    from launcher.tokenizer import load_tokenizer

    if (args.num_proc is not None and args.num_proc < 1) or args.shard_tokens < 1:
        raise UsageError("--num-proc and --shard-tokens must be 1 or more")
    cfg = load_config(args.config, args.overrides)
    out = Path(args.tokens_out) if args.tokens_out else None
    print(tokenize(cfg, load_tokenizer(cfg), args.num_proc, out, args.shard_tokens))
    return 0


def run_plan(args: argparse.Namespace) -> int:
    from launcher.config import load_config
    from launcher.local_launch import processes_to_start
    from launcher.plan import Allocation, check_step_time, parse_duration, plan_text

    overrides = args.overrides + ([f"deepspeed={args.deepspeed}"] if args.deepspeed else [])
    cfg = load_config(args.config, overrides)
    if args.nodes < 1 or (args.gpus_per_node is not None and args.gpus_per_node < 1) or (args.cpus_per_task is not None and args.cpus_per_task < 1):
        raise UsageError("--nodes, --gpus-per-node and --cpus-per-task must be 1 or more")
    alloc = Allocation(
        args.nodes,
        args.gpus_per_node or processes_to_start(cfg.launch),
        parse_duration(args.time_limit) if args.time_limit else None,
        check_step_time(args.step_time_s),
        cpus_per_task=args.cpus_per_task,
        mem=args.mem,
    )
    device = gpu_memory(args.gpu, args.gpu_memory_gb)
    print(plan_text(cfg, args.config, overrides, alloc, compare_backends=args.compare_backends, device=device, as_json=args.json))
    return 0


def gpu_memory(name: str | None, gigabytes: float | None) -> tuple[str, int] | None:
    """--gpu / --gpu-memory-gb as (name, bytes)."""
    from launcher.memory import GB, GPUS

    if name is not None and gigabytes is not None:
        raise UsageError("--gpu and --gpu-memory-gb both give the memory; keep one of them")
    if gigabytes is not None:
        if not gigabytes > 0 or gigabytes == float("inf"):
            raise UsageError(f"--gpu-memory-gb: {gigabytes} is not a memory size; give the GB per GPU, e.g. 80")
        return f"{gigabytes:g} GB", int(gigabytes * GB)
    if name is None:
        return None
    known = {key.lower(): key for key in GPUS}
    if name.lower() not in known:
        raise UsageError(f"--gpu: '{name}' is not a GPU this table knows ({', '.join(GPUS)}); give --gpu-memory-gb instead")
    return known[name.lower()], GPUS[known[name.lower()]]


def run_inspect(args: argparse.Namespace) -> int:
    """Parameter names, shapes and trainable/frozen under the config's freeze patterns, without training."""
    from launcher.config import load_config
    from launcher.freezing import parameter_listing
    from launcher.local_launch import processes_to_start
    from launcher.validate import validate_run

    cfg = load_config(args.config, args.overrides)
    print(parameter_listing(validate_run(cfg, processes_to_start(cfg.launch)).model))
    return 0


def preflight(cfg, overwrite: bool, world_size: int):
    """The checks a run would make before training, without starting it: the validation pass, output_dir's lock,
    where the run would start (output_dir, resume), room on disk and writable caches, and the documents, the problems
    of the input in one report. Returns the start, what the validation built (`build_run` reuses it in a single
    process) and the lock, held unless output_dir could not be made (then build_run takes it)."""
    from launcher.build import take_lock
    from launcher.errors import Problems
    from launcher.lock import OutputLock
    from launcher.resume import decide_start
    from launcher.validate import check_documents, check_storage_for, validate_run

    problems = Problems()
    checked = validate_run(cfg, world_size, problems)
    lock, start = OutputLock(cfg.output_dir), None
    try:
        # the start is decided under the lock, taken before anything touches output_dir: a run started beside this
        # one is refused while this one holds it, or finds its files. A config refused anyway never holds it.
        valid = not problems.lines
        if valid:
            try:
                problems.check(take_lock, lock)
            except OSError:
                pass  # output_dir cannot be made: the checks below say why (a fault of the machine, or bad input)
        if not valid or not problems.lines:  # else a live run holds output_dir: the rest is that run's business
            start = problems.check(decide_start, cfg, overwrite, check_lock=not lock.held(), verify_contents=True)
            if start is None or not start.finished:
                if not problems.lines:  # a fault of the machine (exit 74) ends the run here, before reading the documents writes into the caches
                    check_storage_for(cfg, checked.model)
                problems.check(check_documents, cfg)
        problems.report()
    except BaseException:
        lock.release()
        raise
    return start, checked, lock


def report(summary, cfg) -> None:
    """The main process's lines about a run's outcome (a launcher.exits.RunOutcome)."""
    if summary.preempted:
        checkpoint = summary.checkpoint
        if summary.requeue:
            print(
                f"preempted: stopped after step {summary.steps}; checkpoint {checkpoint}; requeue asked for"
                f" (inside a SLURM job; elsewhere run again with resume=auto to continue)"
            )
        else:
            print(
                f"stopped after step {summary.steps} (SIGTERM, SIGHUP or Ctrl-C); checkpoint {checkpoint}; no requeue asked for;"
                f" run again with resume=auto to continue"
            )
        return
    if summary.eval_loss is not None:
        start = f" (at step 0: {summary.first_eval_loss:.4f})" if summary.first_eval_loss is not None else ""
        print(f"eval loss {summary.eval_loss:.4f}{start} after {summary.steps} steps")
    if summary.skipped_steps:
        print(f"{summary.skipped_steps} step(s) skipped for inf/nan gradients (by the fp16 loss scaler, or DeepSpeed's overflow check)")
    if summary.nonfinite_steps:
        print(f"{summary.nonfinite_steps} step(s) dropped for an inf/nan loss or gradient (diagnostics.nonfinite: skip)")
    if summary.nonfinite:
        print(f"stopped at step {summary.steps}: inf/nan loss or gradient (report on stderr and in {cfg.output_dir}/nonfinite.json)")
        return
    from launcher.final import describe

    print(f"outputs: {cfg.output_dir}/ (config.yaml, metrics.jsonl, {describe(cfg)})")
