"""What every ``vlmprune`` command shares: its one-line error exit and its one-line notices."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator, NoReturn

import typer


def fail(message: str) -> NoReturn:
    """Print ``error: message`` on stderr as one line (a message of several lines, e.g. a library's
    error, is joined with spaces) and exit with code 2."""
    one_line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    typer.secho(f"error: {one_line}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


#: The CLI's dtype spellings (``fp32`` / ``bf16`` / ``fp16``) -> torch's, which are accepted too.
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def dtype_option(value: str, *, auto: bool = False) -> str | None:
    """``--dtype`` -> torch's spelling (``"float32"``, ``"bfloat16"``, ``"float16"``); ``"auto"`` -> None
    where the command takes it (``auto``: the saved dtype). Anything else: ``fail``."""
    if auto and value == "auto":
        return None
    if value not in DTYPES and value not in DTYPES.values():
        fail(f"--dtype must be {'auto (the saved dtype), ' if auto else ''}fp32, bf16 or fp16, got {value!r}")
    return DTYPES.get(value, value)


def note(message: str) -> None:
    """Print ``note: message`` on stderr."""
    typer.secho(f"note: {message}", fg=typer.colors.YELLOW, err=True)


@contextmanager
def notices_as_lines() -> Iterator[None]:
    """Within the block, vlmprune's notices (``ImagesOnlyProcessorWarning``) print as one
    ``warning: ...`` line on stderr, each time they are raised; other warnings as Python shows them."""
    from .integrations.compat import ImagesOnlyProcessorWarning

    with warnings.catch_warnings():  # restores the filters and ``showwarning`` on exit
        warnings.simplefilter("always", ImagesOnlyProcessorWarning)
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, ImagesOnlyProcessorWarning):
                typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield
