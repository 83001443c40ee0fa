"""The same job in this launcher, HF Trainer, a plain Accelerate loop and Lightning Fabric, against an exact reference.

Every framework trains the same tiny Llama-style model (made locally, `launcher make-tiny-model`) from the same
fp32 weights on the same samples in the same order, with the same global batch (micro-batch x accumulation x 2
gloo ranks), AdamW, constant LR and clipping. The samples have very different lengths and are padded, not packed
(and, in the second table, only their completions are targets), so a mean per micro-batch weights tokens
unequally; the reference is one process taking one big batch per step with the exact mean over its target tokens.

It prints the tables and writes them to OUT/peers.json and OUT/peers.png:
- exactness, on padded text and on prompt-masked samples: per framework and accumulation (1, 4, 8 at the same
  global batch), the max |loss - reference| over the steps (the loss each framework reports) and the max
  |W - W_ref| after the last step;
- speed: target tokens/s of each framework relative to this launcher, median of alternating rounds (each run
  includes the framework's own overhead and data loading as its documentation sets it up; the first step is
  not timed).

Usage: python benchmarks/peers.py [--steps 8] [--rounds 7] [--out outputs/peers]
       python benchmarks/peers.py --only launcher --no-speed      (the exactness of the launcher alone: a test runs this)
The peers' versions are pinned in the `peers` extra: pip install -e '.[peers]'.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FRAMEWORKS = {  # name: (how it is run, what it is)
    "launcher": ("launcher", "this launcher: `launcher train` under torchrun, exact token-weighted loss"),
    "trainer": ("trainer", "HF Trainer, defaults (token-level loss with num_items_in_batch, average_tokens_across_devices=True)"),
    "trainer-per-rank-tokens": ("trainer-per-rank-tokens", "HF Trainer, average_tokens_across_devices=False"),
    "accelerate": ("accelerate", "Accelerate loop as documented: accelerator.accumulate, mean loss per micro-batch"),
    "fabric": ("fabric", "Lightning Fabric: no_backward_sync, mean loss per micro-batch / accumulation"),
}
PEER_MODULES = {"trainer": "transformers", "trainer-per-rank-tokens": "transformers", "accelerate": "accelerate", "fabric": "lightning_fabric"}
# Float noise in the weights scales with the LR: AdamW divides each gradient entry by its own running magnitude,
# so an entry whose contributions nearly cancel (its sum then mostly rounding) still moves by up to ~LR. At 3e-4 (a
# usual fine-tuning LR) the exact runs stay below 1e-5; the peers' systematic differences scale with the LR too.
WORLD_SIZE, LR, SEQ_LEN = 2, 3e-4, 64


def cpu_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(
        ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1"
    )
    return env


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(WORLD_SIZE),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        *args,
    ]


def make_documents(path: Path, n_docs: int, seed: int = 0) -> Path:
    """Documents of very different lengths (a few tokens to more than a row), cut from the Python docs."""
    import pydoc_data.topics

    text = " ".join(pydoc_data.topics.topics.values()).split()
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for _ in range(n_docs):
            n_words = int(rng.choice([rng.integers(2, 6), rng.integers(6, 20), rng.integers(20, 40)]))
            start = int(rng.integers(0, len(text) - n_words))
            f.write(json.dumps({"text": " ".join(text[start : start + n_words])}) + "\n")
    return path


def make_prompt_completions(path: Path, n_samples: int, seed: int = 1) -> Path:
    """Instruction-style samples: prompts and completions of very different lengths, so that the share of target
    tokens differs a lot from sample to sample."""
    import pydoc_data.topics

    text = " ".join(pydoc_data.topics.topics.values()).split()
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for _ in range(n_samples):
            n_prompt, n_completion = int(rng.integers(2, 30)), int(rng.choice([rng.integers(1, 4), rng.integers(4, 16)]))
            start = int(rng.integers(0, len(text) - n_prompt - n_completion))
            f.write(
                json.dumps(
                    {
                        "prompt": " ".join(text[start : start + n_prompt]) + "\n",
                        "completion": " ".join(text[start + n_prompt : start + n_prompt + n_completion]),
                    }
                )
                + "\n"
            )
    return path


DATA_KINDS = {  # name: (the file's maker, the launcher's data settings)
    "padded": (make_documents, {"format": "text"}),
    "prompt-masked": (make_prompt_completions, {"format": "prompt_completion"}),
}


def launcher_config(model: Path, docs: Path, steps: int, data: dict) -> dict:
    return {
        "seed": 0,
        "model": {"pretrained": str(model)},
        "data": {"path": str(docs), "seq_len": SEQ_LEN, "pack": False, "eval_fraction": 0.0, "shuffle": False, **data},
        "train": {
            "max_steps": steps,
            "learning_rate": LR,
            "lr_schedule": "constant",
            "warmup_steps": 0,
            "weight_decay": 0.0,
            "adam_beta1": 0.9,
            "adam_beta2": 0.95,
            "adam_eps": 1e-8,
            "max_grad_norm": 1.0,
            "log_every": 1,
        },
        "eval": {"at_start": False},
    }


def the_rows(config_path: Path, n_rows: int, out: Path) -> Path:
    """The launcher's own tokenized rows in its order (data.shuffle is false), with exactly its targets, as every
    peer receives them: input ids of width seq_len + 1 and labels of the same width for models that shift them."""
    from launcher.config import load_config
    from launcher.data import IGNORE_INDEX, RowStore, prepare_splits, rows_to_batch
    from launcher.tokenizer import load_tokenizer

    cfg = load_config(config_path)
    tokenizer = load_tokenizer(cfg)
    store = RowStore(prepare_splits(cfg.data, cfg.seed, tokenizer)[0], tokenizer.pad_id)
    if len(store) < n_rows:
        raise SystemExit(f"only {len(store)} rows for {n_rows}; use fewer --steps")
    rows = store.rows(np.arange(n_rows))
    targets = rows_to_batch(rows, n_rows, store.width, pin=False, pad_id=tokenizer.pad_id).labels.numpy()
    labels = np.concatenate([np.full((n_rows, 1), IGNORE_INDEX), targets], axis=1)  # label j is predicted at j - 1
    np.savez(out, input_ids=rows["input_ids"].astype(np.int64), labels=labels.astype(np.int64))
    return out


def run_framework(name: str, work: Path, config_path: Path, rows: Path, model: Path, micro: int, accumulation: int, steps: int) -> dict:
    """One run; returns its losses, tokens/s and weights file, or why it could not run."""
    out = work / f"{name}-acc{accumulation}-{os.urandom(3).hex()}"
    if name == "launcher":
        cmd = torchrun(
            "-m",
            "launcher",
            "train",
            str(config_path),
            f"output_dir={out}",
            f"train.max_steps={steps}",
            f"train.micro_batch_size={micro}",
            f"train.gradient_accumulation_steps={accumulation}",
        )
    else:
        module = PEER_MODULES.get(name)
        if module is not None:
            try:
                __import__(module)
            except ImportError:
                return {"error": f"{module} is not installed (pip install -e '.[peers]')"}
        worker = [
            str(REPO / "benchmarks" / "peer_workers.py"),
            name,
            str(rows),
            str(model),
            str(out),
            "--micro-batch",
            str(micro),
            "--accumulation",
            str(accumulation),
            "--steps",
            str(steps),
            "--lr",
            str(LR),
            "--world-size",
            str(WORLD_SIZE),
        ]
        cmd = [sys.executable, *worker] if name == "reference" else torchrun(*worker)
    proc = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)[-300:]}"}
    if name == "launcher":
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "loss" in r]
        timed = rows[1:]  # the first step is warm-up, as for the peers
        tokens = sum(r["tokens_per_s"] * r["s_per_step"] for r in timed)
        result = {
            "losses": [r["loss"] for r in rows],
            "tokens_per_s": tokens / sum(r["s_per_step"] for r in timed),
            "weights": str(out / "final" / "model.safetensors"),
        }
    else:
        result = json.loads((out / "result.json").read_text())
        result["weights"] = str(out / "weights.safetensors")
    return result


def compare(result: dict, reference: dict) -> dict:
    from safetensors.torch import load_file

    if "error" in result:
        return {"error": result["error"]}
    weights, ref = load_file(result["weights"]), load_file(reference["weights"])
    return {
        "max_loss_diff": max(abs(a - b) for a, b in zip(result["losses"], reference["losses"])),
        "max_weight_diff": max(float((weights[k] - ref[k]).abs().max()) for k in ref),
        "steps": len(result["losses"]),
    }


def exactness(work, config_path, rows, model, names, accumulations, global_batch, steps) -> dict:
    reference = run_framework("reference", work, config_path, rows, model, global_batch // WORLD_SIZE, 1, steps)
    if "error" in reference:
        raise SystemExit(f"the reference run failed: {reference['error']}")
    table = {}
    for accumulation in accumulations:
        micro = global_batch // (WORLD_SIZE * accumulation)
        for name in names:
            result = run_framework(name, work, config_path, rows, model, micro, accumulation, steps)
            table.setdefault(name, {})[str(accumulation)] = compare(result, reference)
            print(f"  {name}, accumulation {accumulation}: {table[name][str(accumulation)]}", flush=True)
    return table


def speed(work, config_path, rows, model, names, accumulation, global_batch, steps, rounds) -> dict:
    """Alternating rounds (every framework once per round, in the same order), ratios within a round."""
    micro = global_batch // (WORLD_SIZE * accumulation)
    per_round = []
    for i in range(rounds):
        rates = {name: run_framework(name, work, config_path, rows, model, micro, accumulation, steps).get("tokens_per_s") for name in names}
        per_round.append(rates)
        print(f"  round {i + 1}: " + ", ".join(f"{n} {r:,.0f}" if r else f"{n} n/a" for n, r in rates.items()), flush=True)
    table = {}
    for name in names:
        ratios = [r[name] / r["launcher"] for r in per_round if r.get(name) and r.get("launcher")]
        rates = [r[name] for r in per_round if r.get(name)]
        table[name] = (
            {
                "tokens_per_s": statistics.median(rates),
                "ratio_median": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "rounds": len(ratios),
            }
            if ratios
            else {"error": "did not run"}
        )
    return table


def print_tables(results: dict) -> None:
    accumulations = [str(a) for a in results["accumulations"]]
    for kind, table in results["exactness"].items():
        print(f"\nexactness against the reference (one process, one big batch, exact token mean), {kind} data, same global batch:")
        print(f"{'framework':<26}" + "".join(f"{'acc ' + a + ': loss':>16}{'weights':>11}" for a in accumulations))
        for name, row in table.items():
            cells = [
                f"{'n/a':>16}{'n/a':>11}" if "error" in row[a] else f"{row[a]['max_loss_diff']:>16.1e}{row[a]['max_weight_diff']:>11.1e}"
                for a in accumulations
            ]
            print(f"{name:<26}" + "".join(cells) + (f"   ({row[accumulations[0]]['error']})" if "error" in row[accumulations[0]] else ""))
    if "speed" in results:
        print(f"\nspeed at accumulation {results['speed_accumulation']}, padded data, relative to the launcher (median of alternating rounds):")
        for name, row in results["speed"].items():
            print(
                f"{name:<26}"
                + (
                    f"  n/a ({row['error']})"
                    if "error" in row
                    else f"{row['ratio_median']:>7.3f}x  ({row['ratio_min']:.3f}-{row['ratio_max']:.3f}, "
                    f"{row['tokens_per_s']:,.0f} tokens/s, {row['rounds']} rounds)"
                )
            )


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(results["exactness"])
    panels = len(kinds) + ("speed" in results)
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.8), squeeze=False)
    accumulations = [str(a) for a in results["accumulations"]]
    width = 0.8 / len(accumulations)
    for ax, kind in zip(axes[0], kinds):
        names = list(results["exactness"][kind])
        for i, a in enumerate(accumulations):
            values = [results["exactness"][kind][n][a].get("max_weight_diff", np.nan) for n in names]
            ax.bar(np.arange(len(names)) + i * width, [max(v, 1e-12) for v in values], width, label=f"accumulation {a}")
        ax.set_yscale("log")
        ax.set_xticks(np.arange(len(names)) + width * (len(accumulations) - 1) / 2, names, rotation=20, ha="right")
        ax.set_ylabel("max |W - W_ref| after the last step")
        ax.set_title(f"Exactness, {kind} data (lower is better)")
        ax.legend()
    if "speed" in results:
        ax = axes[0][-1]
        names = list(results["speed"])
        ax.bar(names, [results["speed"][n].get("ratio_median", np.nan) for n in names])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel("target tokens/s relative to the launcher")
        ax.set_title(f"Speed, padded data (median of {results['rounds']} rounds)")
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(FRAMEWORKS), help="frameworks to run, comma-separated (the reference always runs)")
    parser.add_argument("--accumulation", type=int, nargs="+", default=[1, 4, 8], help="accumulation steps to compare at one global batch")
    parser.add_argument("--global-batch", type=int, default=32, help="samples per optimizer step (a multiple of 2 x each accumulation)")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=7, help="alternating speed rounds")
    parser.add_argument("--speed-accumulation", type=int, default=4)
    parser.add_argument("--no-speed", action="store_true", help="the exactness tables only")
    parser.add_argument("--data", nargs="+", choices=list(DATA_KINDS), default=list(DATA_KINDS), help="the data of the exactness tables")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "peers")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in FRAMEWORKS]
    if unknown or any(args.global_batch % (WORLD_SIZE * a) for a in args.accumulation):
        parser.error(f"unknown frameworks {unknown}" if unknown else "--global-batch must be a multiple of 2 x each accumulation")
    if not args.no_speed and "padded" not in args.data:
        parser.error("the speed rounds use the padded data: add it to --data, or pass --no-speed")
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="peers-", dir=args.out))
    try:
        from launcher.models.tiny import make_tiny_model

        model = make_tiny_model(work / "tiny-llama", "llama")
        import yaml

        results = {
            "accumulations": args.accumulation,
            "global_batch": args.global_batch,
            "steps": args.steps,
            "settings": {n: FRAMEWORKS[n][1] for n in names},
            "exactness": {},
        }
        print(f"{args.steps} steps of {args.global_batch} samples (seq_len {SEQ_LEN}, padded), 2 gloo ranks, fp32, lr {LR}")
        for kind in args.data:
            make, data = DATA_KINDS[kind]
            source = make(work / f"{kind}.jsonl", args.global_batch * args.steps + 64)
            config_path = work / f"launcher-{kind}.yaml"
            config_path.write_text(yaml.safe_dump(launcher_config(model, source, args.steps, data)))
            rows = the_rows(config_path, args.global_batch * args.steps, work / f"rows-{kind}.npz")
            print(f"{kind} data:")
            results["exactness"][kind] = exactness(work, config_path, rows, model, names, args.accumulation, args.global_batch, args.steps)
        if not args.no_speed:
            make, data = DATA_KINDS["padded"]
            config_path, rows = work / "launcher-padded.yaml", work / "rows-padded.npz"
            print("speed (padded data):")
            results["speed"] = speed(work, config_path, rows, model, names, args.speed_accumulation, args.global_batch, args.steps, args.rounds)
            results["speed_accumulation"], results["rounds"] = args.speed_accumulation, args.rounds
        print_tables(results)
        (args.out / "peers.json").write_text(json.dumps(results, indent=1) + "\n")
        chart(results, args.out / "peers.png")
        print(f"\nwrote {args.out / 'peers.json'} and {args.out / 'peers.png'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
