"""The data pipeline at scale: tokenize+pack throughput, peak memory, and the start time on a cache hit.

Generates a JSON-lines corpus of about --size-mb MB of text (documents of 200 to 6,000 characters of
random words), trains a byte-level BPE tokenizer (the tiny models' one, 1,024 ids), then:
1. tokenizes and packs the corpus cold with data.num_proc processes (a child process runs
   prepare_splits, as a run's set-up does), sampling the resident memory of it and its workers;
2. starts `launcher train` on it (a cache hit), and measures the time from the process start to the
   first metrics row (step 1), and the peak resident memory while it trains --steps steps.

Run from the repository root (about 1 GB: tens of minutes on 2 cores; --size-mb 50 for a quick look):
  .venv/bin/python benchmarks/data_pipeline.py --size-mb 1024 --num-proc 2 --work /tmp/launcher-data-bench
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]


def write_corpus(path: Path, size_mb: int) -> int:
    """Random documents of words from a fixed vocabulary, to `size_mb` MB; returns the bytes of text."""
    rng = np.random.default_rng(0)
    words = np.array(
        [w for w in open(Path(np.__file__).parent / "__init__.py").read().split() if w.isalpha()][:4000]
        + ["the", "of", "and", "to", "in", "a", "is", "that"] * 50
    )
    target, written = size_mb * 1_000_000, 0
    with path.open("w") as f:
        while written < target:
            lengths = rng.integers(30, 900, size=2000)  # words per document
            picks = rng.integers(0, len(words), size=int(lengths.sum()))
            start = 0
            lines = []
            for n in lengths:
                text = " ".join(words[picks[start : start + n]])
                start += n
                lines.append(json.dumps({"text": text}))
                written += len(text)
            f.write("\n".join(lines) + "\n")
    return written


class PeakMemory:
    """Samples the memory of a process and its children every 0.2 s: the peak of their summed proportional set size
    (PSS: resident memory, pages shared between them counted once), and of the process alone its resident memory
    with its file-backed (memory-mapped) pages left out."""

    def __init__(self, pid: int):
        self.process, self.peak_tree, self.peak_main_anon = psutil.Process(pid), 0, 0
        self.done = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.done:
            try:
                procs = [self.process, *self.process.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_full_info().pss
                    except psutil.Error:
                        pass
                info = self.process.memory_info()
                self.peak_tree = max(self.peak_tree, total)
                self.peak_main_anon = max(self.peak_main_anon, info.rss - info.shared)
            except psutil.Error:
                pass
            time.sleep(0.2)

    def stop(self):
        self.done = True
        self.thread.join()


def child_tokenize(config: str) -> None:
    """In a child process: what a run's set-up does with the data, timed."""
    sys.path.insert(0, str(REPO))
    from launcher.config import load_config
    from launcher.data import load_documents, prepare_splits, target_counts
    from launcher.tokenizer import load_tokenizer

    cfg = load_config(config)
    started_s = time.perf_counter()
    load_documents(cfg.data)
    loaded_s = time.perf_counter()
    train, _ = prepare_splits(cfg.data, cfg.seed, load_tokenizer(cfg))
    done_s = time.perf_counter()
    tokens = int(np.asarray(train.select_columns(["length"])[:]["length"]).sum())
    print(
        json.dumps(
            {
                "load_s": loaded_s - started_s,
                "total_s": done_s - started_s,
                "rows": len(train),
                "tokens": tokens,
                "targets": int(target_counts(train).sum()),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--work", default="/tmp/launcher-data-bench")
    parser.add_argument("--child-tokenize", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_tokenize:
        return child_tokenize(args.child_tokenize)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / f"corpus-{args.size_mb}mb.jsonl"
    if not corpus.exists():
        started_s = time.perf_counter()
        write_corpus(corpus.with_suffix(".tmp"), args.size_mb)
        corpus.with_suffix(".tmp").rename(corpus)
        print(f"wrote {corpus} ({corpus.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - started_s:.0f}s")
    tokenizer = work / "tokenizer"
    if not tokenizer.exists():
        sys.path.insert(0, str(REPO))
        from launcher.models.tiny import train_tokenizer

        train_tokenizer("llama").save_pretrained(tokenizer)
    cache = work / f"cache-{args.size_mb}mb-np{args.num_proc}"
    config = work / "bench.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(work / "run"),
                "tokenizer": str(tokenizer),
                "model": {"n_layer": 2, "n_head": 2, "d_model": 64},
                "data": {"path": str(corpus), "seq_len": 256, "pack": True, "eval_fraction": 0, "num_proc": args.num_proc, "cache_dir": str(cache)},
                "train": {"micro_batch_size": 8, "max_steps": args.steps, "log_every": 1},
            }
        )
    )
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache / "hf"), "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    text_mb = corpus.stat().st_size / 1e6

    cold = subprocess.Popen([sys.executable, __file__, "--child-tokenize", str(config)], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    memory = PeakMemory(cold.pid)
    out, _ = cold.communicate()
    memory.stop()
    result = json.loads(out.strip().splitlines()[-1])
    tokenize_s = result["total_s"] - result["load_s"]
    print(f"corpus: {text_mb:.0f} MB of JSON lines, {result['tokens']:,} tokens in {result['rows']:,} rows of 257")
    print(f"load (JSON to Arrow, cold): {result['load_s']:.1f}s")
    print(
        f"tokenize+pack, {args.num_proc} processes: {tokenize_s:.1f}s = {text_mb / tokenize_s:.1f} MB/s,"
        f" {result['tokens'] / tokenize_s:,.0f} tokens/s"
    )
    print(f"peak memory during tokenization (PSS of the process and its workers together): {memory.peak_tree / 2**20:,.0f} MiB")

    started_s = time.perf_counter()
    metrics = work / "run" / "metrics.jsonl"
    run = subprocess.Popen(
        [sys.executable, "-m", "launcher", "train", str(config), "--overwrite"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    memory = PeakMemory(run.pid)
    first_step_s = None
    while run.poll() is None and first_step_s is None:
        if metrics.exists() and '"loss"' in metrics.read_text():
            first_step_s = time.perf_counter() - started_s
        time.sleep(0.05)
    _, err = run.communicate()
    memory.stop()
    if run.returncode != 0:
        sys.exit(f"training failed:\n{err[-3000:]}")
    print(f"cache hit: process start to the first step {first_step_s:.1f}s (includes importing torch)")
    print(
        f"peak memory during training ({args.steps} steps, PSS): {memory.peak_tree / 2**20:,.0f} MiB"
        f" ({memory.peak_main_anon / 2**20:,.0f} MiB without memory-mapped file pages)"
    )
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
