"""Memory budgets: how many bytes one Jacobian block may take."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from cvcore.errors import InputError

if TYPE_CHECKING:
    from cvcore.errors import ResourceError

#: Fraction of the currently available memory a block may use by default.
DEFAULT_FRACTION = 0.25
#: Never default to more than this (bytes), however much memory is free.
DEFAULT_CAP = 4 << 30
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20,
          "mb": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def available_memory() -> int | None:
    """Bytes of physical memory available now (Linux ``MemAvailable``), if known."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def default_budget() -> int:
    """A quarter of the available host memory, at most 4 GiB (1 GiB if unknown)."""
    free = available_memory()
    if free is None:
        return 1 << 30
    return max(16 << 20, min(DEFAULT_CAP, int(free * DEFAULT_FRACTION)))


def parse_budget(value: str | int | None) -> int:
    """Turn ``"512MB"``, ``"2GiB"``, ``1048576`` or ``None`` (the default) into bytes.

    >>> parse_budget("512MB")
    536870912
    >>> parse_budget(1024)
    1024
    """
    if value is None:
        return default_budget()
    if isinstance(value, int):
        n = value
    else:
        text = value.strip().lower().replace(" ", "")
        digits = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(digits):]
        try:
            n = int(float(digits) * _UNITS[unit])
        except (KeyError, ValueError):
            raise InputError(
                f"expected a memory budget such as '512MB' or '2GiB', got {value!r}"
            ) from None
    if n <= 0:
        raise InputError(f"expected a positive memory budget, got {value!r}")
    return n


def kernel_bytes(n_samples: int, n_outputs: int, kernel: str, itemsize: int) -> int:
    """Bytes a request needs beyond the Jacobian budget: the kernel in the working precision,
    its float64 copy for the eigensolver, and the solver's workspace (about one more copy).

    >>> kernel_bytes(1000, 10, "traced", 4)
    20000000
    """
    dim = n_samples * (n_outputs if kernel == "full" else 1)
    return dim * dim * (itemsize + 2 * 8)


def ensure_fits(n_samples: int, n_outputs: int, kernel: str, itemsize: int,
                available: int | None = None) -> None:
    """Refuse, before any work, a kernel that cannot fit in memory even blocked.

    Backends call this once they know the number of outputs. The Jacobian is blocked to
    the budget, but the kernel and its eigendecomposition must fit whole.

    Raises:
        ResourceError: with the estimate and the options that would make it fit.
    """
    from cvcore.errors import ResourceError

    free = available_memory() if available is None else available
    need = kernel_bytes(n_samples, n_outputs, kernel, itemsize)
    if free is None or need <= free:
        return
    dim = n_samples * (n_outputs if kernel == "full" else 1)
    traced = kernel_bytes(n_samples, n_outputs, "traced", itemsize) if kernel == "full" else None
    raise ResourceError(
        f"expected a kernel that fits in memory, got a {kernel} kernel of dimension {dim} "
        f"needing about {_gib(need)} with {_gib(free)} available (the kernel must fit whole; "
        f"--memory-budget bounds only the Jacobian blocks); options: "
        f"{'; '.join(memory_options(kernel, traced))}"
    )


def memory_options(kernel: str | None = None, traced: int | None = None) -> list[str]:
    """What makes a measurement fit in memory, in the words of the command line."""
    options = ["fewer samples (--samples; the kernel grows as N²)"]
    if kernel != "traced":
        size = "" if traced is None else f": {_gib(traced)}"
        options.append(f"the traced kernel (--kernel traced, N × N{size})")
    options += ["--method stochastic (trace and entropy with error bars, matrix-free)",
                "the trace alone (--variables trace), which never forms the kernel",
                "a smaller --memory-budget (the bytes one Jacobian block may use)"]
    return options


def is_allocation_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation that failed: ``MemoryError`` (NumPy's included),
    torch's ``OutOfMemoryError`` or its CPU allocator's refusal, or XLA's
    ``RESOURCE_EXHAUSTED``."""
    if isinstance(exc, MemoryError):
        return True
    if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (CUDA)
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "can't allocate memory" in text or "RESOURCE_EXHAUSTED" in text)


@contextlib.contextmanager
def failed_allocations(*, budget: str | int | None = None, samples: int | None = None,
                       kernel: str | None = None, itemsize: int = 4) -> Iterator[None]:
    """Turn an allocation that fails inside the block into :func:`allocation_failure`'s
    one-line :class:`ResourceError` (the Python API's counterpart of the CLI's handling);
    cvcore's own refusals and every other error pass through unchanged."""
    from cvcore.errors import CVCoreError

    try:
        yield
    except CVCoreError:
        raise
    except (MemoryError, RuntimeError) as exc:
        if not is_allocation_failure(exc):
            raise
        raise allocation_failure(exc, budget=budget, samples=samples, kernel=kernel,
                                 itemsize=itemsize) from None


def allocation_failure(exc: BaseException, *, budget: str | int | None = None,
                       samples: int | None = None, kernel: str | None = None,
                       itemsize: int = 4) -> ResourceError:
    """A failed allocation as a one-line :class:`ResourceError`: what was needed (the
    allocator's words, else at least the N × N kernel when N is known), the memory
    available and the Jacobian block budget, and what to change.

    >>> str(allocation_failure(MemoryError(), samples=1000, budget="1GiB"))[:60]
    'expected the measurement to fit in memory, got an allocation'
    """
    from cvcore.errors import ResourceError

    words = " ".join(str(exc).split())
    if words:
        needed = f"({words[:200]})"
    elif samples is not None:
        needed = (f"(no size given; the {samples} × {samples} kernel alone needs at least "
                  f"{_gib(kernel_bytes(samples, 1, 'traced', itemsize))})")
    else:
        needed = "(no size given)"
    free = available_memory()
    try:
        block = _bytes(parse_budget(budget))
    except InputError:
        block = repr(budget)
    origin = "the default" if budget is None else "--memory-budget"
    return ResourceError(
        f"expected the measurement to fit in memory, got an allocation failure {needed} with "
        f"{'an unknown amount' if free is None else _gib(free)} available and a Jacobian "
        f"block budget of {block} ({origin}); options: {'; '.join(memory_options(kernel))}"
    )


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.3g} GiB"


def _bytes(n: int) -> str:
    """``4 GiB``, ``64 MiB``: the unit that keeps the number readable."""
    return _gib(n) if n >= 1 << 30 else f"{n / (1 << 20):.3g} MiB"
