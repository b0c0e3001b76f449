"""The one exception type the CLI turns into a one-line error and exit code 2."""


class DcpoError(Exception):
    """A user-facing problem: bad input, a refused operation. Printed as `error: <message>`."""

    exit_code = 2


def first_line(exc: BaseException) -> str:
    """An exception as one line for a DcpoError message: its first line, else its type."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
