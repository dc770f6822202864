"""The Typer application, built by :func:`make_app` (no side effects at import).

One module per command (``cli/<command>.py``); this file only assembles them.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from cvcore.cli.backends import backends
from cvcore.cli.common import OneLineErrors, _state, friendly
from cvcore.cli.compare import compare
from cvcore.cli.export import export
from cvcore.cli.measure import measure
from cvcore.cli.plot import plot
from cvcore.cli.report import report
from cvcore.cli.scaling import scaling
from cvcore.cli.spectrum import spectrum
from cvcore.cli.sweep import sweep

from cvcore import plugins


def make_app() -> typer.Typer:
    """Build the ``cv`` application, with commands from every plugin."""
    app = typer.Typer(name="cv", help="Collective variables (NTK trace, entropy, ...) of neural networks.",
                      no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                      cls=OneLineErrors)

    @app.callback()
    def root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
             version: Annotated[bool, typer.Option("--version", callback=_print_version,
                                                   is_eager=True, help="Print the version and exit.")] = False,
             ) -> None:
        _state["debug"] = debug

    app.command()(friendly(spectrum))
    app.command()(friendly(measure))
    app.command("backends")(friendly(backends))
    app.command()(friendly(report))
    app.command()(friendly(compare))
    app.command()(friendly(plot))
    app.command()(friendly(export))
    app.command()(friendly(sweep))
    app.command()(friendly(scaling))
    plugins.manager().hook.cvcore_register_commands(app=app)
    return app


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            text = version("cvcore")
        except PackageNotFoundError:  # running from a source tree that is not installed
            text = "unknown (not installed)"
        typer.echo(f"cvcore {text}")
        raise typer.Exit()


def main() -> None:
    """Console-script entry point."""
    make_app()(prog_name="cv")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
