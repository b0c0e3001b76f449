"""The one exception type the CLI turns into a one-line error and exit code 2."""


class DcpoError(Exception):
    """A user-facing problem: bad input, a refused operation. Printed as `error: <message>`."""

    exit_code = 2
