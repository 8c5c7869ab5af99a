"""Errors that data preparation shows to users.

Every problem caused by the user's input (a bad URL, a hostile archive, no usable image) is raised as a
:class:`DataError`, a ``ValueError``: the command line and the cog API print its message and no traceback. Messages
name the item (a redacted URL, an archive member) and say what to do.
"""

from __future__ import annotations


class DataError(ValueError):
    """A problem with the training data that the user can fix; the message names the item."""


class SourceError(DataError):
    """A training source that cannot be fetched: unsupported scheme, HTTP or S3 failure, missing path."""


class ArchiveError(DataError):
    """An archive that is refused as a whole: corrupt, encrypted, or over a size, ratio or entry limit."""
