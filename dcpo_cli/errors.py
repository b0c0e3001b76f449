"""The one exception type the CLI turns into a one-line error and exit code 2."""

from __future__ import annotations


class DcpoError(Exception):
    """A user-facing problem: bad input, a refused operation. Printed as `error: <message>`."""

    exit_code = 2


class FieldError(DcpoError):
    """A bad value of named settings, worded without saying how they were given: `fields`
    (their Python names, `eps_low`), `problem` (what is wrong, after the names) and an
    optional `prefix` (before them). The message names the fields as they are; the command
    line words them as its options (`as_flags`: `--eps-low`)."""

    def __init__(self, fields: str | tuple[str, ...], problem: str, prefix: str = "",
                 flags: bool = False) -> None:
        self.fields = (fields,) if isinstance(fields, str) else tuple(fields)
        self.problem, self.prefix, self.flags = problem, prefix, flags
        names = [f"--{f.replace('_', '-')}" if flags else f for f in self.fields]
        super().__init__(f"{prefix}{' and '.join(names)} {problem}")

    @property
    def field(self) -> str:
        return self.fields[0]

    def as_flags(self) -> FieldError:
        """The same error, the fields named as command-line options."""
        return FieldError(self.fields, self.problem, self.prefix, flags=True)

    def __reduce__(self):  # pickled (a worker process's error) with its fields
        return FieldError, (self.fields, self.problem, self.prefix, self.flags)


def first_line(exc: BaseException) -> str:
    """An exception as one line for a DcpoError message: its first line, else its type."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
