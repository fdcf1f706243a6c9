"""The errors lesionml raises on purpose: each one is a complete, one-line message for a user.

The CLI prints them without a traceback; anything else escaping is a bug in lesionml.
"""


class LesionMLError(Exception):
    """Base class: the message names the file or setting and what is wrong with it."""

    exit_code = 1


class ConfigError(LesionMLError):
    """params.yaml or a --set override is invalid."""

    exit_code = 2


class DataError(LesionMLError):
    """The data release (metadata, images, archives) is unusable as given."""


class StorageError(LesionMLError):
    """An output could not be written (disk full, quota, read-only folder); nothing was replaced."""


def summarize(problem: str, offenders: list[str], limit: int = 5) -> str:
    """'N <problem>: a, b, c (and M more)': counts first, then the first offenders by name."""
    shown = ", ".join(offenders[:limit])
    more = f" (and {len(offenders) - limit} more)" if len(offenders) > limit else ""
    return f"{len(offenders)} {problem}: {shown}{more}"
