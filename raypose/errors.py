"""One error family: what failed, where, and how to fix it."""

from __future__ import annotations


class RayposeError(Exception):
    """Base of every error raypose raises on purpose; the CLI prints it as one line."""

    exit_code = 1


class SpecError(RayposeError):
    """The job spec is invalid: names the field, what was expected and what was given."""

    exit_code = 2


class JobFailed(RayposeError):
    """The job ran but produced nothing usable (every input failed)."""

    exit_code = 1


class ImageError(Exception):
    """One input that cannot be used (unreadable, undecodable); its message becomes the errors-table reason."""

    def __init__(self, reason: str, stage: str = "decode"):
        super().__init__(reason)
        self.stage = stage
