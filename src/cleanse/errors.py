"""User-facing errors.

Every problem caused by the user's input (configuration, data, paths) is raised as a
:class:`CleanseError`. The command line prints its message and exits with status 2; nothing
else is written, because every artifact write is atomic (see :mod:`cleanse.storage`).
"""

from __future__ import annotations


class CleanseError(Exception):
    """A problem with the user's input. The message names the key, file or value at fault."""


class ConfigError(CleanseError):
    """Invalid ``params.yaml`` or ``--set`` override."""


class DataError(CleanseError):
    """Invalid or unreadable data source."""


class ArtifactError(CleanseError):
    """A required upstream artifact is missing or was produced with another configuration."""


class TrainingDivergedError(CleanseError):
    """Training produced a non-finite loss (a learning rate or L2 coefficient too large for the data);
    raised at the first such epoch, before any model is written."""
