"""How the start on token shards grows with the corpus, up to terabytes: opening the shards and reading the first
step's window, at several corpus sizes side by side.

A start on format tokens reads each shard's header and file sizes, one offset per 1,000 documents (to locate
rows), then a step reads its rows. This writes, per size, one shard whose `.idx` is real (documents of 200 to
1,800 tokens) and whose `.bin` is a sparse file of the right size (no tokens on disk: a start reads none but the
rows of its first window), then times in a fresh process: opening the shards (`launcher.data.tokens.open_tokens`),
the epoch's order and the first window's 512 rows (their ids, and the target counts of the window): a first start
(which reads every 1,000th offset and writes the table of groups under the data cache) and a later one (which
reads that table). With --cold the page cache is dropped before each (root only), so the offsets come from the
disk.

Run from the repository root (the indexes take 8 bytes a document under --work; delete it afterwards):
  .venv/bin/python benchmarks/token_start.py --docs 1e6 1e7 1e8 3e8 --work /tmp/launcher-token-start
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launcher.data.tokens import HEADER, MAGIC  # noqa: E402

WIDTH = 2049  # seq_len 2048


def write_index(folder: Path, n_docs: int) -> Path:
    """A shard of `n_docs` documents: its index written in chunks, its tokens a sparse file."""
    folder.mkdir(parents=True, exist_ok=True)
    bin_path, idx_path = folder / "train.bin", folder / "train.idx"
    if idx_path.exists():
        return bin_path
    rng, chunk, total = np.random.default_rng(0), 10_000_000, 0
    tmp = idx_path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        f.write(b"\0" * HEADER.size)
        f.write(np.zeros(1, dtype="<u8").tobytes())
        for first in range(0, n_docs, chunk):
            lengths = rng.integers(200, 1800, size=min(chunk, n_docs - first), dtype=np.uint64)
            f.write((total + np.cumsum(lengths)).astype("<u8").tobytes())
            total += int(lengths.sum())
        f.seek(0)
        f.write(HEADER.pack(MAGIC, 2, 0, total, n_docs, 1000))
    with bin_path.open("wb") as f:
        f.truncate(2 * total)  # sparse: the size a start checks, no blocks written
    tmp.replace(idx_path)
    return bin_path


MEASURE = """
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from launcher.batches import BatchLayout, epoch_order, order_kind, step_window
from launcher.data.tokens import open_tokens
t1 = time.perf_counter()
from pathlib import Path
rows = open_tokens(Path(sys.argv[1]), "data.path", int(sys.argv[2]), 0, 1 << 16, cache_dir=Path(sys.argv[3]))
t2 = time.perf_counter()
kind = order_kind(len(rows))
order = epoch_order(len(rows), 1, 0, True, kind)
window = step_window(order, 0, 512)
batch = rows.rows(window)
targets = int(rows.target_counts[window].sum())
t3 = time.perf_counter()
import psutil
mem = psutil.Process().memory_info()  # resident: its own memory, and the pages of the files it maps (shared)
print(json.dumps({"rows": len(rows), "order": kind, "open_s": t2 - t1, "first_window_s": t3 - t2, "anon_mib": (mem.rss - mem.shared) / 2**20, "mapped_mib": mem.shared / 2**20}))
"""


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=float, nargs="+", default=[1e6, 1e7, 1e8, 3e8])
    parser.add_argument("--work", default="/tmp/launcher-token-start")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each start (root)")
    args = parser.parse_args()
    work = Path(args.work)
    results = []
    for n in (int(d) for d in args.docs):
        started_s = time.perf_counter()
        bin_path = write_index(work / f"docs-{n}", n)
        tokens = (bin_path.stat().st_size) // 2
        print(
            f"{n:,} documents, {tokens / 1e9:.0f} B tokens ({2 * tokens / 1e9:,.0f} GB of uint16): index ready in {time.perf_counter() - started_s:.0f}s"
        )
        shutil.rmtree(work / "cache", ignore_errors=True)
        result = {"docs": n, "tokens": tokens}
        for start in ("first", "later"):
            cold = drop_caches() if args.cold else False
            cmd = [sys.executable, "-c", MEASURE, str(bin_path), str(WIDTH), str(work / "cache")]
            out = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(out.stderr[-3000:])
            result[start] = json.loads(out.stdout.strip().splitlines()[-1]) | {"cold": cold}
        results.append(result)
        print(f"  {json.dumps(result)}", flush=True)
    print(
        "\n| documents | corpus (uint16) | rows of 2,049 | order | open the shards: first start | later start"
        " | first window (512 rows) | own memory | mapped pages resident (first start) |\n|---|---|---|---|---|---|---|---|---|"
    )
    for r in results:
        first, later = r["first"], r["later"]
        print(
            f"| {r['docs']:,} | {2 * r['tokens'] / 1e9:,.0f} GB | {later['rows']:,} | {later['order']} | {1e3 * first['open_s']:,.1f} ms"
            f" | {1e3 * later['open_s']:,.1f} ms | {1e3 * later['first_window_s']:,.1f} ms | {later['anon_mib']:,.0f} MiB"
            f" | {first['mapped_mib']:,.0f} MiB |"
        )
    small, large = results[0], results[-1]
    ratio = lambda start, key: large[start][key] / small[start][key]  # noqa: E731
    print(
        f"\n{large['docs'] / small['docs']:,.0f}x the documents: opening x{ratio('first', 'open_s'):.1f} on a first start,"
        f" x{ratio('later', 'open_s'):.1f} on a later one; first window x{ratio('later', 'first_window_s'):.1f};"
        f" own memory x{ratio('later', 'anon_mib'):.2f} ({'page cache dropped before each' if large['later']['cold'] else 'index in the page cache'})"
    )


if __name__ == "__main__":
    main()
