"""Errors vlhub raises on purpose. The CLI turns each into one line and an exit code."""

from __future__ import annotations


class VlhubError(Exception):
    """Base of every error vlhub reports to a user. `exit_code` is what the CLI exits with."""

    exit_code = 2


class UserError(VlhubError):
    """Bad input or usage: a missing path, an unknown model, an invalid option (exit 2)."""


class CorruptCheckpoint(UserError):
    """A checkpoint file or index that cannot be read as what it claims to be."""


class UnsafePickle(CorruptCheckpoint):
    """A pickle that asks for something beyond rebuilding arrays; refused before anything runs."""


class Note(UserWarning):
    """Something a user should know that does not stop the command (an old spelling read, say): the CLI prints it
    as one `note:` line on stderr."""


class CheckFailed(VlhubError):
    """A check ran and found a problem (exit 1)."""

    exit_code = 1
