"""Errors that name a user's file or folder and say how to fix it; the command line prints them as one line."""
from __future__ import annotations

from visionattn.errors import InvalidInputError, UserError

__all__ = ["DataError", "ExportError", "SegmentError", "UserError"]


class DataError(InvalidInputError):
    """A data set or input file that cannot be used as given; the message names the file or folder."""


class ExportError(InvalidInputError):
    """Something about the model, the options or the output path of an export; the message says what to change."""


class SegmentError(InvalidInputError):
    """A problem with one case of ``segment`` (or the whole call), or with a NIfTI file; the message names what
    and how to fix it."""
