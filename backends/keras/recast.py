"""Keras models in another dtype: a fresh copy re-created from the model's config with
every floating dtype policy set to the requested one (the user's model is untouched).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from cvcore.backends.keras.setup import _first_line, to_numpy

from cvcore.errors import ModelError
from cvcore.imports import require

_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64", "mixed_float16", "mixed_bfloat16")


def _set_dtype(config: Any, dtype: str) -> Any:
    """A serialized Keras config with every floating dtype / dtype policy set to ``dtype``."""
    if isinstance(config, list):
        return [_set_dtype(v, dtype) for v in config]
    if not isinstance(config, dict):
        return config
    out = {}
    for key, value in config.items():
        if key == "dtype" and isinstance(value, str) and value in _FLOAT_DTYPES:
            value = dtype
        elif key == "dtype" and isinstance(value, dict) and str(
                value.get("class_name", "")).endswith("DTypePolicy"):
            value = {"module": "keras", "class_name": "DTypePolicy",
                     "config": {"name": dtype}, "registered_name": None}
        else:
            value = _set_dtype(value, dtype)
        out[key] = value
    return out


def layers_of(model: Any) -> list[Any]:
    """The model and every layer inside it."""
    flatten = getattr(model, "_flatten_layers", None)
    return list(flatten(include_self=True)) if flatten is not None else [model]


def needs_recast(model: Any, dtype: str) -> bool:
    """Whether the model computes or stores its floating weights in another dtype."""
    keras = require("keras", "tensorflow")
    for var in model.weights:
        if keras.backend.is_float_dtype(var.dtype) and keras.backend.standardize_dtype(
                var.dtype) != dtype:
            return True
    return any(getattr(layer, "compute_dtype", dtype) != dtype for layer in layers_of(model))


def recast(model: Any, first: Any, dtype: str) -> Any:
    """A fresh copy of ``model`` built in ``dtype`` from its config (the user's model is
    untouched); its weights are never used, only its variables' order and shapes."""
    keras = require("keras", "tensorflow")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Keras warns about serializing a lambda
            config = _set_dtype(keras.saving.serialize_keras_object(model), dtype)
    except Exception as exc:  # noqa: BLE001 - no get_config: one line
        raise _recast_error(model, dtype, exc) from None
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(dtype)  # sub-layers built without an explicit dtype
    try:
        clone = _deserialize(keras, config)
        if not clone.built:
            clone(first)
    except Exception as exc:  # noqa: BLE001 - any failure to rebuild: one line
        raise _recast_error(model, dtype, exc) from None
    finally:
        keras.config.set_dtype_policy(previous)
    ours = [tuple(v.shape) for v in model.trainable_variables + model.non_trainable_variables]
    theirs = [tuple(v.shape) for v in clone.trainable_variables + clone.non_trainable_variables]
    if ours != theirs:
        raise ModelError(
            f"expected a {dtype} copy of the model with the same variables, got shapes "
            f"{theirs[:6]} instead of {ours[:6]}; build the model with dtype='{dtype}'"
        )
    return clone


def _deserialize(keras: Any, config: Any) -> Any:
    """Re-create a model from the config just taken from the live object.

    ``safe_mode=True`` unless the config holds a Python ``lambda`` (an ``Activation`` or
    ``Lambda`` layer): that bytecode was marshalled from the user's own function a moment
    ago, in this process, and is re-created with ``safe_mode=False``. No file is involved:
    a model loaded from a file without ``--trust`` never has such a function (the loaders
    refuse it).
    """
    return keras.saving.deserialize_keras_object(config, safe_mode=not _has_lambda(config))


def _has_lambda(config: Any) -> bool:
    if isinstance(config, list):
        return any(_has_lambda(v) for v in config)
    if isinstance(config, dict):
        return config.get("class_name") == "__lambda__" or any(
            _has_lambda(v) for v in config.values())
    return False


def _recast_error(model: Any, dtype: str, exc: BaseException) -> ModelError:
    return ModelError(
        f"expected a Keras model that can be re-created in {dtype} from its config, got "
        f"{type(model).__name__} ({_first_line(exc)}); build it with dtype='{dtype}' or "
        f"measure with its own dtype"
    )


def check_weights(names: list[str], values: list[Any]) -> None:
    for name, value in zip(names, values):
        if not np.isfinite(to_numpy(value)).all():
            raise ModelError(f"expected finite weights, got NaN or Inf in variable {name!r}")


