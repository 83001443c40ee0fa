"""Each rank's log file, output_dir/logs/rank-N.log: what libraries print during a run, kept off the console, and
(in a multi-process run) the rank's own console (`log_to_rank_file`).

The console of `launcher train` holds the launcher's own lines. The warnings of torch, transformers, accelerate,
DeepSpeed, datasets or peft (Python warnings, and their loggers' WARNING records: accelerate's "Removed shared
tensor" at a checkpoint of a model with tied weights, DeepSpeed's "Setting accelerator to CPU", torch's
FutureWarnings under ZeRO-3) may matter when something goes wrong, so they are kept, each distinct text once per
process: appended to the rank's log once output_dir is open (in a multi-process run that file also holds the rank's
console; a 1-process run's holds only these), those from before (the pre-flight, loading the model) held until
then. A process that never opens output_dir (a run refused for bad input; the parent of a multi-process run, whose
workers repeat its steps) writes nothing. Errors of libraries (ERROR and above) still reach the console, as do the
launcher's own warnings ("launcher: warning: ...", printed, never through `warnings`).
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

HELD_MAX = 1000  # records held before output_dir is open; a library repeating itself cannot fill the memory
SEEN_MAX = 10_000  # distinct texts remembered, to write each once per process

_held: list[str] = []
_seen: set[str] = set()
_path: Path | None = None  # the log file, once output_dir is open; made at its first record
_file = None


class _LibraryLogger(logging.Logger):
    """A logger whose WARNING records go to the rank's log instead of the handlers (the console). Others take their
    usual way: errors to the console, and lower levels to what the library chose (torch's checkpoint logger sends
    its DEBUG records to a NullHandler: nowhere)."""

    def handle(self, record: logging.LogRecord) -> None:
        if not logging.WARNING <= record.levelno < logging.ERROR or self.disabled or not self.filter(record):
            return super().handle(record)
        _write(f"{record.levelname} {record.name}: {record.getMessage()}")


# warnings the launcher asks a library for, shown on the console: --debug's deterministic kernels name each op that has none
ASKED_FOR = ("does not have a deterministic implementation, but you set 'torch.use_deterministic_algorithms(True, warn_only=True)'",)


def _show_warning(message, category, filename, lineno, file=None, line=None, _console=warnings.showwarning) -> None:
    # the launcher warns in lines of its own, never through `warnings`: every Python warning is a library's
    if any(text in str(message) for text in ASKED_FOR):
        return _console(message, category, filename, lineno, file, line)
    _write(warnings.formatwarning(message, category, filename, lineno, line).rstrip("\n"))


def _write(text: str) -> None:
    global _file
    if text in _seen:  # a warning raised at every step (a deprecated collective under ZeRO-3) is written once
        return
    if len(_seen) < SEEN_MAX:
        _seen.add(text)
    if _path is None:
        if len(_held) < HELD_MAX:
            _held.append(text)
        return
    try:
        if _file is None:
            _path.parent.mkdir(exist_ok=True)
            _file = open(_path, "a", buffering=1)
        _file.write(text + "\n")
    except OSError:  # a fault of output_dir is reported by the next write of the run that needs it
        pass


def keep_libraries_off_the_console() -> None:
    """From here on (the start of `launcher train`, before the libraries are imported), libraries' warnings and
    WARNING log records are held for the rank's log."""
    warnings.showwarning = _show_warning
    logging.setLoggerClass(_LibraryLogger)
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if type(logger) is logging.Logger:  # made by a module imported before this: routed the same way
            logger.__class__ = _LibraryLogger


def rank_log(output_dir: Path, rank: int) -> Path:
    return output_dir / "logs" / f"rank-{rank}.log"


def write_library_output_to(output_dir: Path, rank: int) -> None:
    """Once output_dir is open: what was held, then every later record, appended to the rank's log."""
    global _path
    if _path is None:
        _path = rank_log(output_dir, rank)
        held = list(_held)
        _held.clear()
        _seen.clear()
        for text in held:
            _write(text)


def log_to_rank_file(output_dir: Path, rank: int) -> None:
    """From here on, this rank's stdout and stderr also go to output_dir/logs/rank-N.log (appended across restarts)."""
    try:
        (output_dir / "logs").mkdir(exist_ok=True)
        log = open(rank_log(output_dir, rank), "a", buffering=1)
    except OSError:
        return  # a fault of output_dir is reported by the next write that needs it
    sys.stdout, sys.stderr = _Tee(sys.stdout, log), _Tee(sys.stderr, log)


class _Tee:
    """A text stream writing to the console and a log file (the file without progress-bar redraws)."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        if "\r" not in text:
            try:
                self.log.write(text)
            except OSError:
                pass
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()
        try:
            self.log.flush()
        except OSError:
            pass

    def __getattr__(self, name):
        return getattr(self.stream, name)
