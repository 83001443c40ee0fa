"""Errors that end a run with one line per problem and no traceback (exit codes: exits.py)."""


class UsageError(Exception):
    """Bad input. Each entry of `lines` names the key or file at fault and the fix."""

    def __init__(self, *lines: str):
        super().__init__("\n".join(lines))
        self.lines = list(lines)


class RunFault(Exception):
    """The machine failed the run (no space left, a read-only or vanished output_dir, an unwritable cache).
    Each entry of `lines` says what failed, where, and how to continue. `quiet`: another rank reports it."""

    def __init__(self, *lines: str, quiet: bool = False):
        super().__init__("\n".join(lines))
        self.lines, self.quiet = list(lines), quiet


class Problems:
    """The UsageError lines of independent checks, collected so that one report names every problem at once."""

    def __init__(self):
        self.lines: list[str] = []

    def check(self, check, *args, **kwargs):
        """`check(*args, **kwargs)`'s result, or None after recording its problems."""
        try:
            return check(*args, **kwargs)
        except UsageError as err:
            self.lines += [line for line in err.lines if line not in self.lines]
            return None

    def report(self) -> None:
        if self.lines:
            raise UsageError(*self.lines)
