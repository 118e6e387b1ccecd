"""Errors in what a user gave us (a name, an option, a file), as opposed to bugs.

Every error visionattn raises about its input derives from :class:`UserError` and from the built-in type a
Python caller would expect (``KeyError`` for an unknown name, ``TypeError`` for an unknown argument,
``ValueError`` for a bad file or value). The command line prints a :class:`UserError` as one line and
exits with 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem with the input; the message names it and how to fix it."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnknownModelError(UserError, KeyError):
    """A model name that is not registered."""


class ModelArgumentError(UserError, TypeError):
    """A keyword argument the model does not take."""


class InvalidInputError(UserError, ValueError):
    """A value or file that cannot be used as given."""


class TrainingInterrupted(Exception):
    """A training stopped on request (Ctrl-C, SIGTERM) after writing a checkpoint of the step it stopped at;
    ``checkpoint`` is that file. Not an error: the command line says how to continue and exits with 130."""

    def __init__(self, message: str, checkpoint: str):
        super().__init__(message)
        self.checkpoint = checkpoint
