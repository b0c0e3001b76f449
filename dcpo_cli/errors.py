"""The one exception type the CLI turns into a one-line error and exit code 2."""

from __future__ import annotations


class DcpoError(Exception):
    """A user-facing problem: bad input, a refused operation. Printed as `error: <message>`."""

    exit_code = 2


class FieldError(DcpoError):
    """A bad value of named settings, worded without saying how they were given: `fields`
    (their Python names, `eps_low`), `problem` (what is wrong, after the names) and an
    optional `prefix` (before them). The message names the fields as they are; the side
    that took them from the user words them its way (`as_flags`: `--eps-low`)."""

    def __init__(self, fields: str | tuple[str, ...], problem: str, prefix: str = "",
                 names=None) -> None:
        self.fields = (fields,) if isinstance(fields, str) else tuple(fields)
        self.problem, self.prefix = problem, prefix
        named = " and ".join((names or str)(field) for field in self.fields)
        super().__init__(f"{prefix}{named} {problem}")

    @property
    def field(self) -> str:
        return self.fields[0]

    def as_flags(self) -> FieldError:
        """The same error, the fields named as command-line options."""
        return FieldError(self.fields, self.problem, self.prefix,
                          names=lambda field: "--" + field.replace("_", "-"))


def first_line(exc: BaseException) -> str:
    """An exception as one line for a DcpoError message: its first line, else its type."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
