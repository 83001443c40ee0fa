"""The data pipeline at scale: tokenize throughput, and the start time and memory of a run, at several corpus sizes.

For each --sizes-mb size, generates a JSON-lines corpus of about that many MB of text (documents of 200 to
6,000 characters of random words; a byte-level BPE tokenizer of 1,024 ids, the tiny models'), then:
1. `launcher tokenize` with 2 processes (and, for the first size, with 1 into a cache of its own: the
   scaling), cold (the size's cache and shards of an earlier run are removed first; the corpora and the
   tokenizer are kept, their contents fixed by the seed), with `--tokens-out`: the token shards of the same
   documents;
2. `launcher train` on the text (a cache hit) and on the token shards (data.format: tokens), --repeats times
   each, every size's runs interleaved: the time from the process start to the first metrics row (step 1; the
   median), and the peak memory of the process while it trains --steps steps (PSS, and its anonymous part: what
   it allocated, without the pages of the files it maps; the largest).
3. the data part of such a start alone, in a fresh process after its imports: preparing the splits, the
   epoch's order and the first window's rows (the median of --repeats), and once more with the page cache
   dropped first (as root), as on a node that has not read the data since it was written.
At the end, the largest size against the first side by side (start difference, memory ratio) and the
tokenize speed-up of 2 processes over 1 (both with --tokens-out).

Run from the repository root (the corpora, caches and shards take about 3x the text on disk under --work:
delete it afterwards):
  .venv/bin/python benchmarks/data_pipeline.py --sizes-mb 50 2000 --work /tmp/launcher-data-bench
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
    (PSS: resident memory, a page shared by n processes counted 1/n in each), and of its anonymous and shared-memory
    part (what they allocated themselves, without the pages of files they map: Pss_Anon + Pss_Shmem)."""

    def __init__(self, pid: int):
        self.process, self.peak_tree, self.peak_tree_anon = psutil.Process(pid), 0, 0
        self.done = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.done:
            try:
                procs = [self.process, *self.process.children(recursive=True)]
            except psutil.Error:
                procs = []
            total, anon = 0, 0
            for p in procs:
                fields = rollup(p.pid)
                total += fields.get("Pss", 0)
                anon += fields.get("Pss_Anon", 0) + fields.get("Pss_Shmem", 0)
            self.peak_tree, self.peak_tree_anon = max(self.peak_tree, total), max(self.peak_tree_anon, anon)
            time.sleep(0.2)

    def stop(self):
        self.done = True
        self.thread.join()


def rollup(pid: int) -> dict[str, int]:
    """/proc/PID/smaps_rollup in bytes ({} for a process gone)."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
    except OSError:
        return {}
    return {name.rstrip(":"): int(kb) * 1024 for name, kb, *_ in (line.split() for line in lines)}


def prepare(work: Path, size_mb: int) -> tuple[Path, Path]:
    """The corpus of `size_mb` MB and the tokenizer, written once."""
    corpus = work / f"corpus-{size_mb}mb.jsonl"
    if not corpus.exists():
        started_s = time.perf_counter()
        write_corpus(corpus.with_suffix(".tmp"), size_mb)
        corpus.with_suffix(".tmp").rename(corpus)
        print(f"wrote {corpus} ({corpus.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - started_s:.0f}s", flush=True)
    tokenizer = work / "tokenizer"
    if not tokenizer.exists():
        sys.path.insert(0, str(REPO))
        from launcher.models.tiny import train_tokenizer

        train_tokenizer("llama").save_pretrained(tokenizer)
    return corpus, tokenizer


def write_bench_config(work: Path, size_mb: int, corpus: Path, tokenizer: Path, cache: Path, steps: int, name: str = "", **data) -> Path:
    config = work / f"bench-{size_mb}mb{name}{'-tokens' if data else ''}.yaml"  # each its own file: they are read later
    config.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(work / "run"),
                "tokenizer": str(tokenizer),
                "model": {"n_layer": 2, "n_head": 2, "d_model": 64},
                "data": {"path": str(corpus), "seq_len": 256, "pack": True, "eval_fraction": 0, "cache_dir": str(cache), **data},
                "train": {"micro_batch_size": 8, "max_steps": steps, "log_every": 1},
            }
        )
    )
    return config


def env_for(cache: Path) -> dict:
    return {**os.environ, "HF_DATASETS_CACHE": str(cache / "hf"), "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}


def run_tokenize(config: Path, cache: Path, num_proc: int, tokens_out: Path | None) -> tuple[str, float, float]:
    """`launcher tokenize`: its summary line, and the peak PSS of it and its workers and of their own memory (MiB)."""
    cmd = [sys.executable, "-m", "launcher", "tokenize", str(config), "--num-proc", str(num_proc)]
    cmd += ["--tokens-out", str(tokens_out)] if tokens_out else []
    proc = subprocess.Popen(cmd, cwd=REPO, env=env_for(cache), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    memory = PeakMemory(proc.pid)
    out, _ = proc.communicate()
    memory.stop()
    if proc.returncode != 0:
        sys.exit(f"launcher tokenize failed:\n{out[-3000:]}")
    return out.strip().splitlines()[-1], memory.peak_tree / 2**20, memory.peak_tree_anon / 2**20


DATA_PART = """
import sys, time
from launcher.batches import BatchLayout
from launcher.config import load_config
from launcher.data import TrainData, prepare_splits
from launcher.tokenizer import load_tokenizer
cfg = load_config(sys.argv[1])
tokenizer = load_tokenizer(cfg)
started_s = time.perf_counter()
train, _ = prepare_splits(cfg.data, cfg.seed, tokenizer)
TrainData(train, BatchLayout(cfg.train.micro_batch_size, 1, 1), 0, cfg.seed, cfg.data.shuffle, False).window(0)
print(time.perf_counter() - started_s)
"""


def data_part(config: Path, cache: Path, cold: bool) -> float:
    """Seconds a start spends on its data, in a fresh process after the imports: preparing the splits (a cache hit),
    the epoch's order and the first window's rows; `cold`: with the page cache dropped first (root only)."""
    if cold:
        drop_page_cache()
    out = subprocess.run([sys.executable, "-c", DATA_PART, str(config)], cwd=REPO, env=env_for(cache), capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"the data part failed:\n{out.stderr[-3000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def train_once(config: Path, cache: Path, work: Path) -> tuple[float, float, float]:
    metrics = work / "run" / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    started_s = time.perf_counter()
    run = subprocess.Popen(
        [sys.executable, "-m", "launcher", "train", str(config), "--overwrite"],
        cwd=REPO,
        env=env_for(cache),
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
    return first_step_s, memory.peak_tree / 2**20, memory.peak_tree_anon / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[50, 2000])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each start measurement: the median start, the largest peak")
    parser.add_argument("--work", default="/tmp/launcher-data-bench")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    kinds = ("text (cache hit)", "token shards")
    configs, scaling = {}, None
    for n, size_mb in enumerate(args.sizes_mb):  # 1. each size tokenized, cold
        corpus, tokenizer = prepare(work, size_mb)
        cache, shards = work / f"cache-{size_mb}mb", work / f"tokens-{size_mb}mb"
        for folder in (cache, shards):  # cold: what an earlier run of the benchmark prepared is made again
            shutil.rmtree(folder, ignore_errors=True)
        config = write_bench_config(work, size_mb, corpus, tokenizer, cache, args.steps)
        started_s = time.perf_counter()
        line, peak, own = run_tokenize(config, cache, 2, shards)
        two_s = time.perf_counter() - started_s
        print(f"{size_mb} MB, launcher tokenize --num-proc 2: {line} (peak PSS with workers {peak:,.0f} MiB, {own:,.0f} MiB not mapped)", flush=True)
        if n == 0:  # the scaling: the same corpus and work with 1 process, cold, into a cache of its own
            cache_1, shards_1 = work / f"cache-{size_mb}mb-np1", work / "tokens-np1"
            for folder in (cache_1, shards_1):
                shutil.rmtree(folder, ignore_errors=True)
            config_1 = write_bench_config(work, size_mb, corpus, tokenizer, cache_1, args.steps, name="-np1")
            started_s = time.perf_counter()
            line, peak, own = run_tokenize(config_1, cache_1, 1, shards_1)
            scaling = (time.perf_counter() - started_s, two_s)
            print(f"{size_mb} MB, launcher tokenize --num-proc 1: {line} (peak PSS {peak:,.0f} MiB, {own:,.0f} MiB not mapped)", flush=True)
            for folder in (cache_1, shards_1):
                shutil.rmtree(folder, ignore_errors=True)
        tokens_config = write_bench_config(work, size_mb, shards / "train", tokenizer, cache, args.steps, format="tokens")
        configs[size_mb] = {kinds[0]: (config, cache), kinds[1]: (tokens_config, cache)}
    os.sync()  # what tokenize wrote is on disk before anything is timed, not flushed during it
    starts = {(size, kind): [] for size in args.sizes_mb for kind in kinds}
    for _ in range(args.repeats):  # 2. the starts, the sizes interleaved so that the machine's drift falls on all alike
        for size_mb in args.sizes_mb:
            for kind in kinds:
                starts[size_mb, kind].append(train_once(*configs[size_mb][kind], work))
    rows = []
    for (size_mb, kind), runs in starts.items():
        rows.append((size_mb, kind, float(np.median([r[0] for r in runs])), max(r[1] for r in runs), max(r[2] for r in runs)))
        print(
            f"{size_mb} MB, {kind}: process start to the first step {rows[-1][2]:.2f}s (median of {args.repeats}: "
            f"{', '.join(f'{r[0]:.2f}' for r in runs)}); peak while training {args.steps} steps: PSS {rows[-1][3]:,.0f} MiB,"
            f" {rows[-1][4]:,.0f} MiB without memory-mapped file pages",
            flush=True,
        )
    parts = {}  # 3. the data part alone, warm (the median of --repeats) and with the page cache dropped (root)
    can_drop = os.geteuid() == 0
    for size_mb in args.sizes_mb:
        for kind in kinds:
            warm = float(np.median([data_part(*configs[size_mb][kind], cold=False) for _ in range(args.repeats)]))
            parts[size_mb, kind] = (warm, data_part(*configs[size_mb][kind], cold=True) if can_drop else None)
            cold = f", {parts[size_mb, kind][1]:.3f}s from a dropped page cache" if can_drop else ""
            print(f"{size_mb} MB, {kind}: the data part of a start {warm:.3f}s (page cache warm){cold}", flush=True)
    print("\n| corpus | data | start to first step | data part (warm) | data part (cold) | peak PSS | of it not memory-mapped |")
    print("|---|---|---|---|---|---|---|")
    for size_mb, kind, first_step_s, pss, anon in rows:
        warm, cold = parts[size_mb, kind]
        cold_text = f"{cold:.3f} s" if cold is not None else "not run"
        print(f"| {size_mb:,} MB | {kind} | {first_step_s:.2f} s | {warm:.3f} s | {cold_text} | {pss:,.0f} MiB | {anon:,.0f} MiB |")
    small, large = args.sizes_mb[0], args.sizes_mb[-1]
    if small != large:
        print(f"\n{large:,} MB against {small:,} MB, side by side:")
        for kind in kinds:
            a, b = (next(r for r in rows if r[0] == size and r[1] == kind) for size in (small, large))
            (warm_a, cold_a), (warm_b, cold_b) = parts[small, kind], parts[large, kind]
            cold = f", cold {cold_b - cold_a:+.3f} s" if can_drop else ""
            print(f"  {kind}: start {b[2] - a[2]:+.2f} s (the data part: warm {warm_b - warm_a:+.3f} s{cold}); memory not mapped x{b[4] / a[4]:.3f}")
    if scaling is not None:
        print(
            f"  launcher tokenize at {small:,} MB, end to end (process start included): 1 process {scaling[0]:.1f} s,"
            f" 2 processes {scaling[1]:.1f} s: x{scaling[0] / scaling[1]:.2f}"
        )
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
