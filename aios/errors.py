"""User-facing errors.

An `AiosError` is a mistake the user can fix (bad flag, missing file, unknown tokenizer). The CLI prints
it as one red line and exits non-zero, without a traceback. Anything else is a bug and keeps its
traceback (shown with `--debug`).
"""


class AiosError(Exception):
    """A user error: the message names the problem and the fix, on one line."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


class Terminated(BaseException):
    """SIGTERM arrived before training began: the setup stops at once (nothing was trained or written).

    A BaseException, like KeyboardInterrupt, so that no `except Exception` in between swallows it."""

    def __init__(self, signal_name: str = "SIGTERM"):
        super().__init__(signal_name)
        self.signal_name = signal_name
