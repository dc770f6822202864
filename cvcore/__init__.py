"""cvcore: collective variables of neural networks, for models from any framework.

>>> import numpy as np, cvcore
>>> round(cvcore.collective_variables(np.eye(3)).entropy, 6)
1.098612
"""

from __future__ import annotations

import importlib.metadata

from cvcore import dynamics
from cvcore.api import Measurement, PerLayer, measure, ntk
from cvcore.errors import (
    BackendError,
    CVCoreError,
    InputError,
    KernelError,
    MissingFrameworkError,
    ModelError,
    ResourceError,
    UntrustedFileError,
)
from cvcore.estimate import EstimatedVariables, KernelOperator, estimate
from cvcore.kernel_regime import KernelPrediction, kernel_predictions, kernel_regime_distance
from cvcore.kvp import kernel_operator, kernel_vector_product
from cvcore.nngp import nngp
from cvcore.predict import gradient_descent_mse, regime_distance
from cvcore.protocols import Backend, Implementation, KernelRequest, KernelResult
from cvcore.record import Recorder, RecordStore, StoreError, read_runs
from cvcore.spectrum import (
    CollectiveVariables,
    DiagonalVariables,
    LayerVariables,
    collective_variables,
    diagonal_variables,
    eigenvalues,
)
from cvcore.verify import VerificationError

try:
    __version__ = importlib.metadata.version("cvcore")
except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "Backend",
    "BackendError",
    "CVCoreError",
    "CollectiveVariables",
    "DiagonalVariables",
    "EstimatedVariables",
    "Implementation",
    "InputError",
    "KernelError",
    "KernelOperator",
    "KernelPrediction",
    "KernelRequest",
    "KernelResult",
    "LayerVariables",
    "Measurement",
    "MissingFrameworkError",
    "ModelError",
    "PerLayer",
    "RecordStore",
    "Recorder",
    "ResourceError",
    "StoreError",
    "UntrustedFileError",
    "VerificationError",
    "collective_variables",
    "diagonal_variables",
    "dynamics",
    "eigenvalues",
    "estimate",
    "gradient_descent_mse",
    "kernel_operator",
    "kernel_predictions",
    "kernel_regime_distance",
    "kernel_vector_product",
    "measure",
    "nngp",
    "ntk",
    "read_runs",
    "regime_distance",
]
