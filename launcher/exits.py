"""How a run ends: every exit code of `launcher`, in one place.

0   the run finished (or was already finished)
2   bad input (config, data, checkpoint, a busy output_dir): one line each, nothing on disk changed
3   stopped on an inf/nan loss or gradient (diagnostics.nonfinite: stop); the newest checkpoint is good
74  a fault of the machine, not of the input (no space left, a read-only or vanished output_dir, an
    unwritable cache): one line; the newest complete checkpoint is kept, resume=auto continues
75  stopped on purpose (SIGTERM, SIGUSR1, a first Ctrl-C) after a checkpoint: run again to continue
130 a second Ctrl-C: stopped at once, without a checkpoint
"""

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_NONFINITE = 3
EXIT_FAULT = 74  # sysexits' EX_IOERR
EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: stopped early on purpose, run it again to continue
EXIT_ABORTED = 130  # 128 + SIGINT, what a shell reports for a process ended by Ctrl-C
