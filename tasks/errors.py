"""Errors that name a user's file or folder and say how to fix it; the command line prints them as one line."""
from __future__ import annotations

from visionattn.errors import InvalidInputError, UserError

__all__ = ["DataError", "UserError"]


class DataError(InvalidInputError):
    """A data set or input file that cannot be used as given; the message names the file or folder."""
