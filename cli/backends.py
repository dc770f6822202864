"""`cv backends`: every registered backend, loader and adapter, and whether it can run."""

from __future__ import annotations

from cvcore import plugins


def backends() -> None:
    """List every registered backend, loader and adapter, what it needs, and whether it can run."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    reg = plugins.registry()
    table = Table(title="cvcore plugins")
    for col in ("kind", "name", "family", "needs", "available", "install"):
        table.add_column(col)

    def add(kind: str, name: str, family: str, needs: str, plugin: object) -> None:
        ok = getattr(plugin, "available", lambda: True)()
        no_extra = getattr(plugin, "extra", None) is None
        install = "" if ok or no_extra else plugins.install_command(plugin)
        # Text cells: rich would read the "[adapters]" of an install command as markup.
        table.add_row(*(Text(c) for c in (kind, name, family, needs, "yes" if ok else "no",
                                          install)))

    for name, b in reg.backends.items():
        add("backend", name, "", ", ".join(getattr(b, "modules", ())), b)
    for name, ld in reg.checkpoint_loaders.items():
        add("checkpoint loader", name, "", getattr(ld, "library", None) or ld.extra, ld)
    for name, dl in reg.data_loaders.items():
        add("data loader", name, "", getattr(dl, "library", ""), dl)
    for name, a in reg.adapters.items():
        add("adapter", name, a.family, a.library or "", a)
    Console(highlight=False, width=140).print(table)
