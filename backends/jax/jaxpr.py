"""The JAX backend's tracer: a model's one-sample forward pass as a jaxpr, and its evaluator.

:func:`trace` turns the prepared model (:mod:`cvcore.backends.jax.forms`) into a
:class:`Traced` jaxpr, cached per model object and shapes; :func:`probe_outputs` reads O
from it; :func:`evaluate` re-runs a jaxpr equation by equation, optionally perturbing and
recording chosen equations (the structured path's sites). Both the Jacobian path
(:mod:`cvcore.backends.jax.jacobian`) and the structured one
(:mod:`cvcore.backends.jax.structured`) read it; it imports only :mod:`forms`. Also here:
the compile caches' LRU helper (:func:`cached`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from cvcore import outputs
from cvcore.data_io import slice_inputs
from cvcore.errors import CVCoreError, InputError, ModelError
from cvcore.imports import require
from cvcore.protocols import OutputSelector

from .forms import Leaves, Prepared, select_output

#: Primitives whose sub-jaxpr is evaluated equation by equation (call boundaries only).
INLINE = frozenset({"pjit", "jit", "closed_call", "core_call", "checkpoint", "remat",
                    "remat2"})


def extend_core() -> Any:
    from jax.extend import core

    return core


def inlined(eqn: Any) -> tuple[Any, list[Any]] | None:
    """``(jaxpr, consts)`` of a call equation evaluated inline, else ``None``."""
    if eqn.primitive.name not in INLINE:
        return None
    sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    if sub is None:
        return None
    if hasattr(sub, "consts"):  # a ClosedJaxpr
        return sub.jaxpr, list(sub.consts)
    return sub, []


def _bind(eqn: Any, invals: list[Any]) -> list[Any]:
    """Apply one equation's primitive, as ``jax.core.eval_jaxpr`` does."""
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns: list[Any] = []
    if isinstance(params, tuple):  # older JAX: (subfuns, params)
        subfuns, params = params
    manager = getattr(getattr(eqn, "ctx", None), "manager", None)
    with manager if manager is not None else contextlib.nullcontext():
        out = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def evaluate(jaxpr: Any, consts: list[Any], args: list[Any], path: tuple[int, ...],
             sites: Mapping[tuple[int, ...], Any], perts: dict[tuple[int, ...], Any],
             record: dict[tuple[int, ...], Any],
             activation: Callable[[Any, Any, list[Any]], Any] | None = None) -> list[Any]:
    """Evaluate ``jaxpr``, adding ``perts[path]`` to each site's output and storing
    ``activation(site, eqn, invals)`` (the site's input) in ``record[path]``; call
    equations in :data:`INLINE` are evaluated inline. With no sites, a plain evaluator."""
    core = extend_core()
    env: dict[Any, Any] = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, core.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for k, eqn in enumerate(jaxpr.eqns):
        here = (*path, k)
        invals = [read(v) for v in eqn.invars]
        sub = inlined(eqn)
        if sub is not None:
            outs = evaluate(sub[0], sub[1], invals, here, sites, perts, record, activation)
        else:
            outs = _bind(eqn, invals)
            site = sites.get(here)
            if site is not None and activation is not None:
                record[here] = activation(site, eqn, invals)
                outs = [outs[0] + perts[here]]
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


@dataclasses.dataclass
class Traced:
    """A model's one-sample forward pass as a jaxpr.

    Its inputs are the trainable leaves, then ``dynamic`` (this call's other arrays: the
    parameter tree's non-trainable array leaves and the model's constants, such as batch
    statistics), then the sample's arrays; ``consts`` are arrays the function itself
    closes over. ``n_outputs`` is O.
    """

    jaxpr: Any
    consts: list[Any]
    dynamic: list[Any]

    @property
    def n_outputs(self) -> int:
        return int(math.prod(self.jaxpr.outvars[0].aval.shape))


CACHE_SIZE = 8


def cached(cache: collections.OrderedDict[Any, Any], key: Any, make: Callable[[], Any]) -> Any:
    """``cache[key]``, made by ``make()`` when missing; the cache keeps the
    :data:`CACHE_SIZE` most recently used entries (the JAX backend's compile caches)."""
    hit = cache.get(key)
    if hit is None:
        hit = cache[key] = make()
        while len(cache) > CACHE_SIZE:
            cache.popitem(last=False)
    cache.move_to_end(key)
    return hit


#: Traces of recent models, keyed by the model's function object (flax module or
#: ``apply_fn``, held here so its id stays unique) and every input's shape and dtype,
#: as ``jax.jit`` keys its own traces: a function is assumed to compute the same thing
#: each time it is called on the same shapes.
_TRACES: collections.OrderedDict[Any, tuple[Any, Any, list[Any]]] = collections.OrderedDict()


def _avals(tree: Any) -> tuple[Any, ...]:
    jax = require("jax")
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return (treedef, tuple((tuple(np.shape(v)), str(v.dtype)) for v in leaves))


def trace(prep: Prepared, leaves: Leaves, x: Any, output: OutputSelector | None) -> Traced:
    """The one-sample forward pass as a :class:`Traced` jaxpr (from the cache when the
    same function was traced on the same shapes)."""
    jax = require("jax")
    trainable = set(leaves.trainable)
    values = [leaves.values[i] for i in leaves.trainable]
    others = [v for i, v in enumerate(leaves.values) if i not in trainable]
    extra, extra_def = jax.tree_util.tree_flatten((others, prep.constants))
    arrays = [k for k, v in enumerate(extra) if isinstance(v, (jax.Array, np.ndarray))]
    dynamic = [extra[k] for k in arrays]

    def single(values: list[Any], dyn: list[Any], xi: Any) -> Any:
        flat = list(extra)
        for j, k in enumerate(arrays):
            flat[k] = dyn[j]
        rest, constants = jax.tree_util.tree_unflatten(extra_def, flat)
        full, it_values, it_rest = [], iter(values), iter(rest)
        for i in range(len(leaves.values)):
            full.append(next(it_values) if i in trainable else next(it_rest))
        params = jax.tree_util.tree_unflatten(leaves.treedef, full)
        xb = jax.tree_util.tree_map(lambda a: a[None], xi) if prep.batched else xi
        return select_output(prep.call(params, constants, xb), output).reshape(-1)

    first = jax.tree_util.tree_map(lambda a: a[0], slice_inputs(x, 0, 1))
    seen = (id(output), _avals(first), _avals(values), _avals(dynamic))
    if prep.traced is not None and prep.traced[0] == seen:  # this call traced it already
        return prep.traced[1]
    key = None
    if prep.identity is not None and len(arrays) == len(extra):
        try:
            key = (id(prep.identity), prep.form, prep.batched, prep.train, leaves.treedef,
                   tuple(sorted(trainable)), _avals(values), _avals(dynamic), _avals(first),
                   hash(output), jax.config.jax_enable_x64)
        except TypeError:  # an unhashable output selector: no cache
            key = None
    def make() -> tuple[Any, Any, list[Any]]:
        closed = jax.make_jaxpr(single)(values, dynamic, first)
        return prep.identity, closed.jaxpr, list(closed.consts)

    if key is None:
        entry = make()
    else:
        entry = cached(_TRACES, key, make)
        if entry[0] is not prep.identity:  # the id of a collected object, reused
            entry = _TRACES[key] = make()
    result = Traced(entry[1], entry[2], dynamic)
    prep.traced = (seen, result)
    return result


def probe_outputs(prep: Prepared, leaves: Leaves, x: Any, output: Any) -> int:
    """Trace one sample's forward pass; return O, turning a failure into a one-line error.
    The trace is cached (:func:`trace`) and reused by the structured path."""

    try:
        traced = trace(prep, leaves, x, output)
    except CVCoreError:
        raise
    except Exception as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "immutable" in message:
            raise ModelError(
                f"expected a {prep.form} model that measures without updating its state, got "
                f"{message}; build BatchNorm with use_running_average=True or give __call__ a "
                "'train' argument"
            ) from exc
        raise InputError(f"expected inputs the model accepts, got {outputs.describe_inputs(x)}: {message}") from exc
    dtype = np.dtype(traced.jaxpr.outvars[0].aval.dtype)
    if np.issubdtype(dtype, np.complexfloating):
        raise ModelError(f"expected a real floating-point output to differentiate, got {dtype} "
                         "(take its abs, real or imaginary part in the model); pick another "
                         "output with output=")
    return traced.n_outputs
