"""Errors caused by the user's input: reported as one line each, exit code 2, no traceback."""


class UsageError(Exception):
    """Bad input. Each entry of `lines` names the key or file at fault and the fix."""

    def __init__(self, *lines: str):
        super().__init__("\n".join(lines))
        self.lines = list(lines)
