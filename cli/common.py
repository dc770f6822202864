"""What every command shares: one-line errors, the --json / --csv options, row output."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from cvcore.cli.output import print_json, print_table, stderr

from cvcore.errors import CVCoreError
from cvcore.report import Row

F = TypeVar("F", bound=Callable[..., Any])
_state = {"debug": False}


def friendly(func: F) -> F:
    """Turn a cvcore error (a user's mistake) into one line on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CVCoreError as exc:
            if _state["debug"]:
                raise
            stderr().print(f"error: {exc}", markup=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            stderr().print("interrupted: rows already written are kept", markup=False)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON list to stdout.")]
CsvOpt = Annotated[Path | None, typer.Option("--csv", help="Write a CSV table here.")]


def emit(rows: list[Row], as_json: bool, title: str, notes: list[str] | None = None) -> None:
    if as_json:
        print_json(rows)
    else:
        print_table(rows, title=title, notes=notes or ())
