"""One exception hierarchy for every mistake cvcore can report.

Every message says what was expected and what was received, in one line, so the CLI can
print it as is. A missing framework names the exact install command.
"""

from __future__ import annotations


class CVCoreError(Exception):
    """Base class of every error cvcore raises on purpose."""


class InputError(CVCoreError, ValueError):
    """The user's input (a file, an array, an option) is not what was expected."""


class KernelError(InputError):
    """A kernel handed to the spectrum core is not a valid NTK."""


class ModelError(CVCoreError):
    """The model cannot be measured as given (no parameters, bad output, ...)."""


class BackendError(CVCoreError):
    """No backend can handle the model, or the named backend does not exist."""


class MissingFrameworkError(BackendError, ImportError):
    """A backend's framework is not installed."""

    def __init__(self, framework: str, install: str) -> None:
        """``install`` is an extra name (``"torch"``) or a whole ``pip install`` command."""
        command = install if install.startswith("pip ") else f"pip install 'cvcore[{install}]'"
        super().__init__(
            f"{framework} is required for this but is not installed; install it with: {command}"
        )
        self.framework = framework
        self.install = command


class UntrustedFileError(InputError):
    """A pickle-based file names code that cvcore will not run without ``--trust``."""


class ResourceError(CVCoreError, MemoryError):
    """A request cannot fit in the memory budget even when blocked."""


def first_line(exc: BaseException, empty: str | None = None) -> str:
    """The first line of an exception's message, for one-line errors; ``empty`` (default: the
    exception's type name) when it has none.

    >>> first_line(ValueError("bad header\\nmore detail"))
    'bad header'
    >>> first_line(KeyError())
    'KeyError'
    """
    lines = str(exc).strip().splitlines()
    if lines:
        return lines[0]
    return type(exc).__name__ if empty is None else empty


def describe(value: object) -> str:
    """A short description of a value for error messages.

    >>> describe(3)
    'int'
    >>> import numpy as np
    >>> describe(np.zeros((2, 3)))
    'ndarray of shape (2, 3) and dtype float64'
    """
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    name = type(value).__name__
    if shape is not None and dtype is not None:
        return f"{name} of shape {tuple(shape)} and dtype {dtype}"
    return name
