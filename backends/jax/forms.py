"""The JAX backend's model forms: each accepted form as a pure function, its parameter leaves.

Accepted model forms (see ``docs/backend-jax.md``):

* ``(apply_fn, params)``: ``apply_fn(params, x)`` returns the outputs (neural-tangents
  style). A tuple is taken only when its first item is callable (and not a PyTorch,
  TensorFlow or Keras object) and its second is a pytree with at least one leaf that is
  a ``jax.Array``, or whose leaves are all NumPy arrays with at least one floating one
  (that second case only while JAX is imported, so a tuple meant for another framework
  is never taken).
* ``(linen_module, variables)`` or a bound ``flax.linen`` module (``module.bind(v)``),
  or ``(linen_module.apply, variables)``: the ``params`` collection is differentiated,
  the other collections (``batch_stats`` ...) are used in the forward pass only.
* a ``flax.nnx`` module: ``nnx.Param`` state is differentiated, other state is not.
* an ``equinox`` module: inexact array leaves are the parameters; Equinox models take
  one sample (no batch axis), as is the Equinox convention.


:func:`prepare_model` turns a form into a :class:`Prepared` pure function,
:func:`flatten_params` its parameter tree into :class:`Leaves`, :func:`select_output`
picks the measured array out of its raw output. The ground floor of the JAX backend: it
imports nothing else of it, and no JAX at import time.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from cvcore import outputs
from cvcore.errors import ModelError, describe
from cvcore.imports import require
from cvcore.protocols import OutputSelector

#: Top-level modules of objects that are callable but belong to another backend.
FOREIGN_MODULES = ("torch", "tensorflow", "keras", "tf_keras")
#: ``__call__`` keyword names set to ``train`` / ``not train`` for flax.linen modules.
TRAIN_FLAGS = ("train", "training", "is_training")
EVAL_FLAGS = ("deterministic", "use_running_average", "inference", "eval")



# --------------------------------------------------------------------------- forms


def _linen_module_type() -> Any:
    linen = sys.modules.get("flax.linen")
    return None if linen is None else linen.Module


def _is_foreign(obj: object) -> bool:
    return type(obj).__module__.split(".")[0] in FOREIGN_MODULES


def _has_param_leaves(tree: Any, jax: Any) -> bool:
    """Whether a pytree holds a ``jax.Array``, or only NumPy arrays with a floating one."""
    try:
        leaves = jax.tree_util.tree_leaves(tree)
    except Exception:  # noqa: BLE001 - an object that is no pytree is simply not ours
        return False
    if not leaves:
        return False
    if any(isinstance(leaf, jax.Array) for leaf in leaves):
        return True
    return all(isinstance(leaf, np.ndarray) for leaf in leaves) and any(
        np.issubdtype(leaf.dtype, np.inexact) for leaf in leaves)


def model_form(model: object) -> str | None:
    """Which accepted form ``model`` has, without importing anything.

    Returns:
        ``"linen"``, ``"nnx"``, ``"equinox"``, ``"pair"``, or ``None`` when the model is
        not one of the JAX backend's forms.
    """
    jax = sys.modules.get("jax")
    if jax is None:
        return None
    linen_module = _linen_module_type()
    if linen_module is not None and isinstance(model, linen_module):
        return "linen"
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None and isinstance(model, nnx.Module):
        return "nnx"
    eqx = sys.modules.get("equinox")
    if eqx is not None and isinstance(model, eqx.Module):
        return "equinox"
    if not (isinstance(model, tuple) and len(model) == 2):
        return None
    fn, params = model
    if linen_module is not None and isinstance(fn, linen_module) and isinstance(params, Mapping):
        return "linen"
    if not callable(fn) or _is_foreign(fn):
        return None
    return "pair" if _has_param_leaves(params, jax) else None


@dataclasses.dataclass
class Prepared:
    """A model as a pure function: ``call(params, constants, x)`` returns the raw output.

    Attributes:
        call: the forward pass; ``x`` is a batch when ``batched``, else one sample.
        params: the pytree whose inexact leaves are differentiated.
        constants: state used in the forward pass but not differentiated.
        batched: whether ``call`` takes a batch (flax, ``apply_fn``) or one sample (Equinox).
        form: the model form, for messages.
    """

    call: Callable[[Any, Any, Any], Any]
    params: Any
    constants: Any
    batched: bool
    form: str
    #: the object whose code ``call`` runs (flax module, ``apply_fn``), for trace caches;
    #: ``None``: not cached. ``train``: the mode ``call`` runs the model in.
    identity: Any = None
    train: bool = False
    #: the last trace of ``call`` in this measurement (the probe's, reused by the rules)
    traced: Any = None


def _as_call(fn: Callable[..., Any], x: Any, *lead: Any, **kwargs: Any) -> Any:
    """``fn(*lead, x)``, ``fn(*lead, *x)`` or ``fn(*lead, **x)`` as the inputs are packed."""
    if isinstance(x, Mapping):
        return fn(*lead, **x, **kwargs)
    if isinstance(x, tuple):
        return fn(*lead, *x, **kwargs)
    return fn(*lead, x, **kwargs)


def _mode_kwargs(module: Any, train: bool) -> dict[str, bool]:
    """Keyword flags a linen ``__call__`` declares for train / eval behaviour."""
    try:
        names = list(inspect.signature(module.__call__).parameters)[1:]
    except (TypeError, ValueError):
        return {}
    flags = {n: train for n in TRAIN_FLAGS if n in names}
    flags.update({n: not train for n in EVAL_FLAGS if n in names})
    return flags


def _prepare_linen(module: Any, variables: Any, train: bool) -> Prepared:
    jax = require("jax")
    if not isinstance(variables, Mapping) or "params" not in variables:
        got = f"collections {list(variables)}" if isinstance(variables, Mapping) else describe(variables)
        raise ModelError(f"expected flax.linen variables with a 'params' collection, got {got}")
    constants = {k: v for k, v in variables.items() if k != "params"}
    flags = _mode_kwargs(module, train)
    mutable = [k for k in constants if k != "intermediates"] if train else False
    rngs = {"dropout": jax.random.key(0)} if train else None

    def call(params: Any, consts: Any, x: Any) -> Any:
        out = _as_call(module.apply, x, {"params": params, **consts}, mutable=mutable,
                       rngs=rngs, **flags)
        return out[0] if mutable else out

    return Prepared(call, variables["params"], constants, batched=True, form="flax.linen",
                    identity=module, train=train)


def _prepare_nnx(model: Any, train: bool) -> Prepared:
    from flax import nnx

    view = nnx.view(model, deterministic=not train, use_running_average=not train,
                    raise_if_not_found=False)
    graphdef, params, constants = nnx.split(view, nnx.Param, ...)  # type: ignore[misc]

    def call(p: Any, c: Any, x: Any) -> Any:
        return _as_call(nnx.merge(graphdef, p, c), x)

    return Prepared(call, params, constants, batched=True, form="flax.nnx")


def _prepare_equinox(model: Any, train: bool) -> Prepared:
    import equinox as eqx

    model = eqx.nn.inference_mode(model, value=not train)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def call(p: Any, c: Any, x: Any) -> Any:
        return _as_call(eqx.combine(p, static), x)

    return Prepared(call, params, None, batched=False, form="equinox")


def prepare_model(model: Any, train: bool) -> Prepared:
    """Turn an accepted model form into a :class:`Prepared` pure function."""
    form = model_form(model)
    if form == "linen":
        if isinstance(model, tuple):
            return _prepare_linen(model[0], model[1], train)
        if getattr(model, "scope", None) is None:
            raise ModelError(
                "expected a flax.linen module bound to its variables or a (module, variables) "
                f"pair, got an unbound {type(model).__name__}"
            )
        module, variables = model.unbind()
        return _prepare_linen(module, variables, train)
    if form == "nnx":
        return _prepare_nnx(model, train)
    if form == "equinox":
        return _prepare_equinox(model, train)
    if form == "pair":
        fn, params = model
        owner = getattr(fn, "__self__", None)
        linen_module = _linen_module_type()
        if (linen_module is not None and isinstance(owner, linen_module)
                and getattr(fn, "__name__", "") == "apply" and isinstance(params, Mapping)
                and "params" in params):
            return _prepare_linen(owner, params, train)

        def call(p: Any, c: Any, x: Any) -> Any:
            return _as_call(fn, x, p)

        return Prepared(call, params, None, batched=True, form="(apply_fn, params)",
                        identity=fn, train=train)
    raise ModelError(
        "expected (apply_fn, params), (flax.linen module, variables), a flax.nnx module or an "
        f"equinox module, got {describe(model)}"
    )


# --------------------------------------------------------------------------- outputs


def _is_array(value: Any) -> bool:
    jax = require("jax")
    return isinstance(value, (jax.Array, np.ndarray))


def select_output(raw: Any, output: OutputSelector | None) -> Any:
    """Pick one array out of a model's raw output (see :func:`cvcore.outputs.select_output`)."""
    return outputs.select_output(raw, output, is_leaf=_is_array, noun="array")


# --------------------------------------------------------------------------- leaves

@dataclasses.dataclass
class Leaves:
    """The parameter tree as a flat list; ``trainable`` indexes its inexact leaves."""

    values: list[Any]
    treedef: Any
    trainable: list[int]
    paths: list[str]


def is_inexact(value: Any) -> bool:
    """Whether an array's dtype is floating or complex (PRNG key arrays are not)."""
    import jax.numpy as jnp

    return bool(jnp.issubdtype(value.dtype, jnp.inexact))


_KEY = re.compile(r"\['([^']*)'\]|\[\"([^\"]*)\"\]|\[(-?\d+)\]|\.(\w+)")


def tree_path(keystr: str) -> list[str]:
    """The keys of a ``jax.tree_util.keystr`` path.

    >>> tree_path("['params']['Dense_0']['kernel']"), tree_path(".layers[0].weight")
    (['params', 'Dense_0', 'kernel'], ['layers', '0', 'weight'])
    """
    return [next(g for g in m.groups() if g is not None) for m in _KEY.finditer(keystr)]


def dotted(keystr: str) -> str:
    """A leaf's tree path with its keys joined by ``.``, as parameters are named in
    messages and per-layer rows (``['l1']['kernel']`` → ``l1.kernel``).

    >>> dotted(".layers[0].weight"), dotted("")
    ('layers.0.weight', '<root>')
    """
    return ".".join(tree_path(keystr)) or "<root>"


def flatten_params(params: Any) -> Leaves:
    jax = require("jax")
    with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    values = [v for _, v in with_path]
    paths = [jax.tree_util.keystr(p) for p, _ in with_path]
    trainable = [i for i, v in enumerate(values) if isinstance(v, jax.Array) and is_inexact(v)]
    if not trainable:
        raise ModelError("expected a model with trainable parameters, got none (no inexact array leaves)")
    for i in trainable:
        if np.issubdtype(values[i].dtype, np.complexfloating):
            raise ModelError(f"expected real floating-point parameters, got {values[i].dtype} "
                             f"in {dotted(paths[i])!r}")
        if not bool(jax.numpy.isfinite(values[i]).all()):
            raise ModelError(f"expected finite weights, got NaN or Inf in parameter {paths[i] or '<root>'}")
    return Leaves(values=values, treedef=treedef, trainable=trainable, paths=paths)


def with_values(leaves: Leaves, index: Any, replaced: Any, values: Any) -> Any:
    """The parameter pytree with ``values``, its leaves ``index`` replaced by ``replaced``."""
    jax = require("jax")
    full = list(values)
    for k, i in enumerate(index):
        full[i] = replaced[k]
    return jax.tree_util.tree_unflatten(leaves.treedef, full)
