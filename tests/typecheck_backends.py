"""Static contract check: every built-in backend class against each Protocol it implements.

mypy reads this module (``make lint``; ``[tool.mypy] files`` in ``pyproject.toml``): each
assignment below fails to type-check when a backend's method is missing or its signature
drifts from the Protocol in :mod:`cvcore.protocols`. The backends are imported from the
source folders (``backends.*``, what the wheel installs as ``cvcore.backends.*``) and only
for the type checker, so importing this module imports no framework and runs nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from backends.jax.backend import JaxBackend
    from backends.keras.backend import KerasBackend
    from backends.torch.backend import TorchBackend
    from cvcore.protocols import (
        ArrayBackend,
        Backend,
        BatchAxesBackend,
        CountingBackend,
        DiagonalBackend,
        GuardingBackend,
        JacobianBackend,
        NamingBackend,
        OperatorBackend,
        OutputsBackend,
        PerLayerBackend,
        SeedingBackend,
        TakingBackend,
    )


def contracts(torch: TorchBackend, jax: JaxBackend, keras: KerasBackend) -> None:
    """Each built-in backend as each capability it offers (never called)."""
    backends: list[Backend] = [torch, jax, keras]
    diagonals: list[DiagonalBackend] = [torch, jax, keras]
    operators: list[OperatorBackend] = [torch, jax]
    per_layer: list[PerLayerBackend] = [torch, jax, keras]
    seeding: list[SeedingBackend] = [torch, keras]
    guarding: list[GuardingBackend] = [torch]
    counting: list[CountingBackend] = [torch, keras]
    taking: list[TakingBackend] = [torch, jax, keras]
    arrays: list[ArrayBackend] = [torch, jax, keras]
    outputs: list[OutputsBackend] = [torch, jax, keras]
    jacobians: list[JacobianBackend] = [torch, jax, keras]
    naming: list[NamingBackend] = [keras]
    batch_axes: list[BatchAxesBackend] = [torch, jax]
    del (backends, diagonals, operators, per_layer, seeding, guarding, counting, taking, arrays,
         outputs, jacobians, naming, batch_axes)
