"""Structured (per-layer) NTK for PyTorch. Placeholder: no layer rules yet, so every
model takes the Jacobian path (``structured_kernel`` returns ``None``)."""

from __future__ import annotations

from typing import Any


def structured_kernel(prep: Any, x: Any, request: Any, n_outputs: int) -> Any:
    """The kernel from per-layer identities, or ``None`` to use the Jacobian path."""
    return None
