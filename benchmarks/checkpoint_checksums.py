"""What checkpoint checksums cost: a checkpoint's files of a given total size are written (and fsynced, as a save
does), checksummed as the commit does (launcher.checkpoints.checksums, CRC-32 on up to 8 threads), and verified as a
resume's pre-flight does (verify_checkpoint with and without contents). Also the single-core speed of the hashes
the standard library offers, for the choice of CRC-32.

Run from the repository root (about 30 s on 2 CPU cores for 1 GB):
  .venv/bin/python benchmarks/checkpoint_checksums.py [--gb 1]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import time
import zlib
from pathlib import Path

from launcher.checkpoints import STATE_FILE, checksums, verify_checkpoint


def timed(work) -> float:
    started_s = time.perf_counter()
    work()
    return time.perf_counter() - started_s


def write_checkpoint(folder: Path, total_bytes: int) -> dict[str, int]:
    """Files shaped like a one-process AdamW checkpoint: weights 1/3, optimizer state 2/3, a small RNG state."""
    folder.mkdir()
    sizes = {"model.safetensors": total_bytes // 3, "optimizer.bin": total_bytes - total_bytes // 3, "random_states_0.pkl": 14497}
    block = os.urandom(16 << 20)
    for name, size in sizes.items():
        with open(folder / name, "wb") as f:
            for start in range(0, size, len(block)):
                f.write(block[: min(len(block), size - start)])
            f.flush()
            os.fsync(f.fileno())
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=1.0, help="the checkpoint's size in GB (default 1)")
    args = parser.parse_args()
    total_bytes = int(args.gb * 1e9)
    sample = os.urandom(256 << 20)
    for name, digest in (("crc32", zlib.crc32), ("sha256", lambda b: hashlib.sha256(b).digest()), ("blake2b", lambda b: hashlib.blake2b(b).digest())):
        print(f"{name:8s} {len(sample) / 1e6 / timed(lambda digest=digest: digest(sample)):6.0f} MB/s on one core")

    tmp = Path(tempfile.mkdtemp())
    try:
        folder = tmp / "step-000000001"
        save_s = timed(lambda: write_checkpoint(folder, total_bytes))
        names = sorted(p.name for p in folder.iterdir())
        crc32 = {}
        checksum_s = timed(lambda: crc32.update(checksums(folder, names)))
        sizes = {name: (folder / name).stat().st_size for name in names}
        state = {"step": 1, "epoch": 0, "skipped_steps": 0, "global_batch_size": 1, "world_size": 1, "backend": "single process"}
        (folder / STATE_FILE).write_text(json.dumps({**state, "files": sizes, "crc32": crc32}))
        sizes_s = timed(lambda: verify_checkpoint(folder))
        contents_s = timed(lambda: verify_checkpoint(folder, contents=True))
        gb = total_bytes / 1e9
        print(f"checkpoint of {gb:.2f} GB ({os.cpu_count()} CPUs, files in the page cache after the write):")
        print(f"  save (write + fsync)       {save_s:6.2f} s")
        print(f"  + CRC-32 at the commit     {checksum_s:6.2f} s  (+{100 * checksum_s / save_s:.0f}%, {gb / checksum_s:.2f} GB/s)")
        print(f"  verify at resume, sizes    {sizes_s:6.3f} s")
        print(f"  verify at resume, CRC-32   {contents_s:6.2f} s  ({gb / contents_s:.2f} GB/s)")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
