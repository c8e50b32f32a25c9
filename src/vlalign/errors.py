"""Errors a user can fix: the `vlalign` command prints them as one ``error:`` block and exits with status 2.

Raise :class:`UserError` (or a subclass) for mistakes in configuration, paths and input files; the message names
the file or config key and the fix. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (config key, path, input file); printed without a traceback, exit status 2."""


class ConfigError(UserError, ValueError):
    """A configuration mistake found before anything is built; the message names the keys and how to fix them."""


class InputFileError(UserError, ValueError):
    """An input file (annotation list, checkpoint, shard) that cannot be used; the message names the file."""
