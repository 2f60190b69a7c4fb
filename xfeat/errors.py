"""The exceptions xfeat raises for problems a user can fix.

Every one derives from :class:`XfeatError`; the command line prints those as one line
(``Error: ...``) and lets anything else, a bug, show its traceback. Each also derives from the
built-in type that fits it (``ValueError`` for a bad value, ``RuntimeError`` for a failed
step), so ``except ValueError`` keeps working in notebooks.
"""

from __future__ import annotations


class XfeatError(Exception):
    """A problem with the user's input, files or machine; the message says what to do."""


class ConfigError(XfeatError, ValueError):
    """An option has a value xfeat cannot use (the message names it and the valid ones)."""


class DataError(XfeatError, ValueError):
    """A dataset that cannot be used as given."""


class ImageReadError(DataError):
    """One image file (or array row) cannot be decoded."""

    def __init__(self, path: str, reason: str):
        super().__init__(
            f"cannot read image {path}: {reason} (pass --skip-bad / skip_bad=True "
            "to record and skip unreadable images)"
        )
        self.path, self.reason = path, reason


class BackboneError(XfeatError, ValueError):
    """Unknown model, unusable weights, or weights that do not fit the model."""


class WeightsUnavailableError(BackboneError):
    """Weights could not be downloaded and no local copy was found."""


class CacheError(XfeatError, RuntimeError):
    """A cache file is missing, incomplete, damaged, of another format, or of other data."""


class DownloadError(XfeatError, RuntimeError):
    """A built-in dataset could not be downloaded or failed its checksum."""


class OutputError(XfeatError, OSError):
    """An output cannot be written (read-only folder, full disk, a file in the way, busy)."""


class TrainingDiverged(XfeatError, RuntimeError):
    """The loss became infinite or NaN; the message names the run and epoch."""
