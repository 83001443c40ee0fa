"""The other ranks' wait for the main process's set-up (data preparation, output_dir), outside any collective.

Rank 0 tokenizing a large corpus while the others wait in a collective would fail the run after
distributed.timeout_s, a false hang. So the waiting ranks poll a key of the process group's store (a TCP key-value
server that never times a rank out) and only then enter the collective that carries rank 0's result: the wait has
its own bound, distributed.setup_timeout_s, and a progress line while it lasts.
"""

from __future__ import annotations

import sys
import time

from launcher.errors import RunFault

_calls = [0]  # main_first runs the same number of times on every rank: its count names the key


def _store():
    import torch.distributed as dist

    return dist.distributed_c10d._get_default_store()


def setup_key() -> str:
    _calls[0] += 1
    return f"launcher/setup/{_calls[0]}"


def setup_done(key: str) -> None:
    """The main process: its set-up step is over (done or failed); the waiting ranks go on to the collective."""
    _store().set(key, "done")


def wait_for_setup(key: str, what: str, rank: int, bound_s: float, timeout_s: float) -> None:
    """A rank other than the main process: wait until `key` is set. The first waiting rank prints a line every
    min(30 s, timeout_s / 2) while it lasts; RunFault after `bound_s` (distributed.setup_timeout_s)."""
    store, started_s = _store(), time.monotonic()
    every_s = min(30.0, timeout_s / 2)
    next_line_s, poll_s = every_s, 0.01
    while not store.check([key]):  # a check, not store.wait: a wait's timeout logs socket warnings on the console
        waited_s = time.monotonic() - started_s
        if waited_s >= bound_s:
            raise RunFault(
                f"rank 0 did not finish {what} within distributed.setup_timeout_s = {bound_s:g} s; raise it"
                f" (a large corpus to tokenize), or look at rank 0's output in its log",
                quiet=rank != 1,
            )
        if waited_s >= next_line_s and rank == 1:
            print(
                f"launcher: set-up: the other ranks wait for rank 0 to finish {what}: {waited_s:.0f} s so far"
                f" (not a hang; distributed.setup_timeout_s = {bound_s:g} s)",
                file=sys.stderr,
                flush=True,
            )
            next_line_s += every_s
        time.sleep(poll_s)
        poll_s = min(0.5, poll_s * 2)  # a short set-up costs the others milliseconds, a long one a poll a second
