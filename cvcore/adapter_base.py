"""The defaults of an adapter's optional members, in one class.

:class:`cvcore.protocols.Adapter` needs ``name``, ``accepts`` and ``adapt``; everything
else a family may say about itself has a default here, so the core reads
``adapter.expects`` or ``adapter.heads`` and never ``getattr(adapter, "heads", None)``
(``heads`` and ``describe`` are ``None`` for a family without them). Built-in adapters
subclass :class:`AdapterBase`; a third-party adapter may too, and one that does not is
wrapped in :class:`_Adopted` when it registers (:func:`as_adapter`), so the registry holds
only :class:`AdapterBase` instances.

>>> class Plain(AdapterBase):
...     name = "plain"
...     def accepts(self, model): return isinstance(model, str)
...     def adapt(self, model, inputs, output): return model, inputs, output
>>> a = Plain()
>>> a.family, a.expects, a.available(), a.accepts_family("x"), a.heads, a.describe
('plain', 'plain', True, True, None, None)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cvcore.protocols import OutputSelector


class AdapterBase:
    """An adapter with every optional member at its default; subclasses set ``name`` and
    define ``accepts`` and ``adapt``, and override what their family needs.

    Attributes:
        name: the adapter's registry name.
        library: the module it needs (shown by ``cv backends``), or ``None``.
        extra: the ``cvcore[...]`` extra that installs that module, or ``None``.
        install: a whole ``pip install ...`` command (third-party adapters whose library
            is not a cvcore extra), or ``None``.
        heads: ``heads(model)``: the outputs measured side by side, one kernel each, when
            no output is chosen (an actor-critic's ``("actor", "critic")``); ``None``: one
            kernel.
        describe: ``describe(model, inputs, output)``: what is measured, in words (echoed
            in every output's metadata); ``None``: the core names the output.
    """

    name: str
    library: str | None = None
    extra: str | None = None
    install: str | None = None
    heads: Callable[[Any], tuple[str, ...]] | None = None
    describe: Callable[[Any, Any, OutputSelector | None], str] | None = None

    @property
    def family(self) -> str:
        """The name ``family=`` / ``--family`` selects (default: ``name``)."""
        return self.name

    @property
    def expects(self) -> str:
        """The models it takes, in words, for errors (default: ``name``)."""
        return self.name

    def available(self) -> bool:
        """Whether its library is installed (without importing it)."""
        return True

    def accepts(self, model: object) -> bool:
        """Whether ``model`` belongs to this family, from its type alone."""
        raise NotImplementedError

    def accepts_family(self, model: object) -> bool:
        """Whether it can measure ``model`` when its family is named (for models whose
        type alone does not reveal the family; default: :meth:`accepts`)."""
        return self.accepts(model)

    def adapt(self, model: Any, inputs: Any, output: OutputSelector | None
              ) -> tuple[Any, Any, OutputSelector | None]:
        """``(model, inputs, output)`` for the backend."""
        raise NotImplementedError


class _Adopted(AdapterBase):
    """A third-party adapter that does not subclass :class:`AdapterBase`, with the
    defaults filled in: the one place where an adapter's members are looked up by name."""

    def __init__(self, adapter: Any) -> None:
        self.adapter = adapter
        self.name = adapter.name
        for attr in ("library", "extra", "install", "heads", "describe"):
            setattr(self, attr, getattr(adapter, attr, None))

    @property
    def family(self) -> str:
        return str(getattr(self.adapter, "family", self.name))

    @property
    def expects(self) -> str:
        return str(getattr(self.adapter, "expects", self.name))

    def available(self) -> bool:
        told = getattr(self.adapter, "available", None)
        return True if told is None else bool(told())

    def accepts(self, model: object) -> bool:
        return bool(self.adapter.accepts(model))

    def accepts_family(self, model: object) -> bool:
        told = getattr(self.adapter, "accepts_family", None)
        return self.accepts(model) if told is None else bool(told(model))

    def adapt(self, model: Any, inputs: Any, output: OutputSelector | None
              ) -> tuple[Any, Any, OutputSelector | None]:
        adapted: tuple[Any, Any, OutputSelector | None] = self.adapter.adapt(model, inputs,
                                                                             output)
        return adapted

    def __getattr__(self, attr: str) -> Any:
        """Anything else the adapter defines (read only when not found above)."""
        return getattr(self.__dict__["adapter"], attr)


def as_adapter(adapter: Any) -> AdapterBase:
    """``adapter`` itself when it subclasses :class:`AdapterBase`, else wrapped so that
    every optional member has its default."""
    return adapter if isinstance(adapter, AdapterBase) else _Adopted(adapter)
