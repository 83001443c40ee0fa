"""Test-only, on the PYTHONPATH of every process the tests start (conftest.cpu_env): a process that goes into the
interpreter's teardown with gloo threads still running says so on stderr, and the run fails when it was started by
`conftest.run_cli`, `conftest.run_worker` or `test_diagnostics.run_tests_cli` (whatever its exit code), or passed to
`conftest.check`.

Such threads belong to a process group some library still holds; the teardown frees it, and a gloo thread that then
needs the GIL is ended from inside C++: the process aborts (SIGABRT) after a run that succeeded. The launcher's
processes end without that teardown once they have joined a group (distributed.end_process), running the exit hooks
themselves: this hook, called from there, has a Python caller and stays silent; called by the interpreter's
teardown, it has none."""

import atexit
import os
import sys

MARK = "exit probe:"  # conftest.EXIT_PROBE_MARK


def _gloo_threads() -> list[str]:
    names = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:  # not Linux
        return names
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return sorted(name for name in names if "gloo" in name)


def _report() -> None:
    if sys._getframe().f_back is not None:  # run by the program itself, which then ends without the teardown
        return
    alive = _gloo_threads()
    if alive:
        sys.stderr.write(
            f"{MARK} rank {os.environ.get('RANK', '-')} (pid {os.getpid()}) enters the interpreter's teardown with gloo threads: {alive}\n"
        )
        sys.stderr.flush()


atexit.register(_report)  # registered before anything else, so it runs after every other exit hook
