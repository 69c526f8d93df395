"""One error family: what failed, where, and how to fix it.

Every error raypose raises on purpose is a RayposeError; the CLI prints it as one line and exits with its
`exit_code` (2: fix the job or the command; 1: the run failed).
"""

from __future__ import annotations


class RayposeError(Exception):
    """Base of every error raypose raises on purpose; the CLI prints it as one line."""

    exit_code = 1


class SpecError(RayposeError):
    """The job spec is invalid: names the field, what was expected and what was given."""

    exit_code = 2


class JobFailed(RayposeError):
    """The job ran but produced nothing usable (every input failed, too many errors, workers died)."""

    exit_code = 1


class ClusterError(RayposeError):
    """The cluster could not be reached, refused the job, or the job did not finish."""

    exit_code = 1


class LeaseHeld(RayposeError):
    """Another run holds the output's lease (or took it over from this one)."""

    exit_code = 2


class ConvertError(RayposeError):
    """The checkpoint is not what the converter expects: names the keys or option to look at."""

    exit_code = 2


class OutputError(RayposeError):
    """The path is not a readable raypose output, or an option about it is wrong."""

    exit_code = 2


class ImageError(RayposeError):
    """One input that cannot be used (unreadable, undecodable); its message becomes the errors-table reason.

    The stages catch it and write an errors-table row with its `stage`: it never stops a job.
    """

    exit_code = 1

    def __init__(self, reason: str, stage: str = "decode"):
        super().__init__(reason)
        self.stage = stage
