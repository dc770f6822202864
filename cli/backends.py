"""`cv backends`: every registered backend, loader and adapter, and whether it can run."""

from __future__ import annotations

from cvcore.cli.output import plain

from cvcore import plugins


def backends() -> None:
    """List every registered backend, loader and adapter and whether it can run."""
    from rich.console import Console
    from rich.table import Table

    reg = plugins.registry()
    table = Table(title="cvcore plugins")
    for col in ("kind", "name", "available", "install"):
        table.add_column(col)
    for name, b in reg.backends.items():
        ok = b.available()
        table.add_row("backend", name, "yes" if ok else "no", "" if ok else plain(plugins.install_command(b)))
    for name, ld in reg.checkpoint_loaders.items():
        ok = ld.available()
        table.add_row("checkpoint loader", name, "yes" if ok else "no",
                      "" if ok else plain(plugins.install_command(ld)))
    for name in reg.data_loaders:
        table.add_row("data loader", name, "yes", "")
    for name, a in reg.adapters.items():
        ok = getattr(a, "available", lambda: True)()
        table.add_row("adapter", name, "yes" if ok else "no", "")
    Console(highlight=False, width=120).print(table)
