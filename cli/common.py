"""What every command shares: one-line errors, the --json / --csv options, row output."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from cvcore.cli.console import print_json, print_table, stderr

from cvcore.errors import CVCoreError
from cvcore.memory import allocation_failure, is_allocation_failure
from cvcore.rows import Row

F = TypeVar("F", bound=Callable[..., Any])
_state = {"debug": False}


def friendly(func: F) -> F:
    """Turn a cvcore error (a user's mistake) into one line on stderr and exit code 2; an
    allocation that fails (a bare ``MemoryError``, NumPy's, torch's out-of-memory) becomes
    the one-line :class:`~cvcore.errors.ResourceError` of
    :func:`cvcore.memory.allocation_failure`, with the command's own ``--memory-budget``,
    ``--samples`` and ``--kernel``."""

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
        except (MemoryError, RuntimeError) as exc:  # an allocation that failed mid-way
            if _state["debug"] or not is_allocation_failure(exc):
                raise
            refusal = allocation_failure(exc, budget=kwargs.get("memory_budget"),
                                         samples=kwargs.get("samples"),
                                         kernel=kwargs.get("kernel"))
            stderr().print(f"error: {refusal}", markup=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


class OneLineErrors(typer.core.TyperGroup):
    """The ``cv`` group: a usage error (unknown option, a value of the wrong type) is one
    line on stderr and exit status 2, like every other mistake, not a boxed panel."""

    def main(self, args: Any = None, prog_name: str | None = None,  # type: ignore[override]
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                              standalone_mode=False, **extra)
        except typer.Abort:
            typer.echo("interrupted", err=True)
            rv = 130
        except typer.TyperException as exc:  # typer's click: usage errors, bad values
            text = exc.format_message() if hasattr(exc, "format_message") else str(exc)
            if type(exc).__name__ == "NoArgsIsHelpError":  # `cv` alone: the help
                typer.echo(text)
                return 0 if not standalone_mode else sys.exit(0)
            ctx = getattr(exc, "ctx", None)
            where = f"{ctx.command_path}: " if ctx is not None else ""
            typer.echo(f"error: {where}{' '.join(text.split())} (see --help)", err=True)
            rv = getattr(exc, "exit_code", 2)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON list to stdout.")]
CsvOpt = Annotated[Path | None, typer.Option("--csv", help="Write a CSV table here.")]


def emit(rows: list[Row], as_json: bool, title: str, notes: list[str] | None = None) -> None:
    if as_json:
        print_json(rows)
    else:
        print_table(rows, title=title, notes=notes or ())
