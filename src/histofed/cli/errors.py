"""Turn expected errors into one clear line (no traceback) and a non-zero exit."""

from __future__ import annotations

import functools
import os
import sys

import typer


def friendly_errors(fn):
    """Known user errors (bad config, missing data, bad input files) print `error: ...` and exit 2.

    Set HISTOFED_DEBUG=1 to see the full traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from histofed.config import ConfigError
        from histofed.registry import UnknownNameError

        expected: tuple[type[BaseException], ...] = (ConfigError, UnknownNameError, FileNotFoundError)
        try:
            from histofed.engine.loop import RunError
            from histofed.engine.rundir import RunDirError

            expected += (RunError, RunDirError)
            from histofed.data.formats import DataFormatError

            expected += (DataFormatError,)
        except ImportError:
            pass
        try:
            return fn(*args, **kwargs)
        except expected as err:
            if os.environ.get("HISTOFED_DEBUG"):
                raise
            typer.echo(f"error: {err}", err=True)
            sys.exit(2)
        except ValueError as err:  # validation errors from builders carry their own fix
            if os.environ.get("HISTOFED_DEBUG"):
                raise
            typer.echo(f"error: {err}", err=True)
            sys.exit(2)

    return wrapper
