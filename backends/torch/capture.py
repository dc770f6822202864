"""Record what the structured NTK needs from one batched forward pass.

A :class:`torch.overrides.TorchFunctionMode` watches every torch call the model makes.
Calls of ``F.linear``, ``F.conv1d`` / ``F.conv2d``, ``F.embedding``, ``F.layer_norm``,
``F.rms_norm``, ``F.group_norm`` and ``F.batch_norm`` (running statistics) whose weight
or bias is a trainable parameter are recorded as *uses*: the layer input (``a``) and the
output tensor (``z``), whose gradients are taken afterwards. So are ``torch.addmm(b, x, W)``
(GPT-2's ``Conv1D``) and ``x @ W`` / ``torch.matmul(x, W)`` with a parameter ``W`` on the
right (a weight stored ``(d_in, d_out)``, transposed against ``F.linear``'s).
``nn.MultiheadAttention``'s functional form is decomposed into ``F.linear`` calls so its
projections are recorded too. A parameter that appears in any other call (``W @ x``,
``W.t()``, a custom layer) is *tainted* and measured by the Jacobian path instead; every
use of a parameter therefore either has a rule or sends the whole parameter to the exact
fallback.

A use is recorded only when its input's leading size is the number of samples (PyTorch's
``batch_first`` convention), or, for a 2-d input of ``addmm`` / ``matmul``, a multiple
``k·n`` of it (a batch of sequences flattened to rows, read sample-major: rows
``r·k … (r+1)·k − 1`` taken as sample r's); any other use taints its parameters. A
leading size equal to (or a multiple of) the number of samples is necessary, never
sufficient: whether row r really belongs to sample r alone is established afterwards by
:mod:`cvcore.backends.torch.rowcheck`.
Calls that couple samples (batch norm with batch statistics) mark the capture as
*coupled*, and the caller falls back to the Jacobian path. A use whose output is then
changed in place (``nn.ReLU(inplace=True)`` after a linear layer) taints its parameters:
the output-gradient taken afterwards would be that of the changed value.
Rearranged parameters (Keras' permuted convolution kernels) and biases added with
``x + b`` are recorded through :mod:`cvcore.backends.torch.views`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cvcore.protocols import OutputSelector

from .setup import Prepared, bind_arguments, fcall, select_output

#: Tensor methods and properties that only read metadata: a parameter may appear in them.
_METADATA = frozenset({
    "dim", "size", "numel", "is_floating_point", "is_complex", "__len__", "stride",
    "element_size", "is_contiguous", "get_device", "data_ptr", "ndimension", "nelement",
    "__format__", "__repr__", "__hash__", "__bool__", "_is_view", "is_nested",
})
_UNSAFE_PROPERTIES = frozenset({"data", "T", "mT", "H", "mH", "real", "imag", "grad"})


@dataclass
class Use:
    """One recorded call of a recognised op on a parameter.

    Attributes:
        name: the parameter's name.
        key: ``(name, block)``: conv groups are separate row blocks of one weight.
        kind: ``"dense"``, ``"embedding"`` or ``"direct"``.
        z: the call's output, still in the autograd graph.
        a: dense: inputs ``(n, S, d_in)``; embedding: ids ``(n, S)``; direct: unused.
        shape_g: maps the output gradients ``(n, O, *z.shape[1:])`` to the feature's
            ``g`` (dense: ``(n, O, S, d_out)``; direct: ``(n, O, P)``).
        also: further parameters folded into this use: a bias measured together with
            its weight (``a`` then ends in a column of ones, ``[W b]`` acts on ``[a 1]``).
    """

    name: str
    key: tuple[str, int]
    kind: str
    z: Any
    a: Any
    shape_g: Callable[[Any], Any]
    also: tuple[str, ...] = ()
    #: the torch function whose rule recorded the use (``linear``, ``conv2d``, ...)
    op: str = ""
    #: ``z._version`` when recorded: an in-place op on ``z`` afterwards (``ReLU(inplace=True)``)
    #: makes its gradient that of another value, and the use's parameters lose their rule
    version: int = 0

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.also)


@dataclass
class Capture:
    """Everything one forward pass recorded."""

    uses: list[Use] = field(default_factory=list)
    tainted: set[str] = field(default_factory=set)
    coupled: bool = False
    #: the chains of views (:mod:`cvcore.backends.torch.views`) through which a rule read
    #: each parameter; more than one means no rule for it
    views: dict[str, set[tuple[Any, ...]]] = field(default_factory=dict)


class UseRecorder:
    """A torch function mode that fills a :class:`Capture` (built by :func:`recorder`)."""

    def __init__(self, ids: dict[int, str], n: int) -> None:
        self.ids = ids
        self.n = n
        self.capture = Capture()
        self.op = ""
        #: views of parameters: ``id -> chain``, and the views kept alive (their ids stay theirs)
        self.chains: dict[int, tuple[Any, ...]] = {}
        self.alive: list[Any] = []
        #: views that are parameters scaled entry by entry: ``id -> factor`` (view's shape)
        self.factors: dict[int, Any] = {}

    # -- helpers used by the rules -------------------------------------------------
    def param(self, t: Any) -> str | None:
        name = self.ids.get(id(t)) if t is not None else None
        if name is not None:
            self.capture.views.setdefault(name, set()).add(self.chains.get(id(t), ()))
        return name

    def alias(self, view: Any, source: Any, step: tuple[Any, ...], factor: Any = None) -> None:
        """Record ``view`` as a rearrangement of the parameter ``source`` (or of a view of
        one), scaled entry by entry by ``factor`` (a tensor of the view's shape) if given."""
        self.ids[id(view)] = self.ids[id(source)]
        self.chains[id(view)] = (*self.chains.get(id(source), ()), step)
        self.alive.append(view)
        if factor is not None:
            self.factors[id(view)] = factor

    def taint_scaled(self, args: Any, kwargs: Any) -> None:
        """Taint the scaled views among a call's arguments: only the rules of
        :mod:`cvcore.backends.torch.views` apply their factors."""
        import torch

        for leaf in torch.utils._pytree.tree_leaves((args, kwargs)):
            if id(leaf) in self.factors:
                self.capture.tainted.add(self.ids[id(leaf)])

    def taint_all(self, args: Any, kwargs: Any) -> None:
        import torch

        for leaf in torch.utils._pytree.tree_leaves((args, kwargs)):
            name = self.ids.get(id(leaf))
            if name is not None:
                self.capture.tainted.add(name)

    def batched(self, t: Any) -> bool:
        return t.dim() >= 1 and int(t.shape[0]) == self.n and self.param(t) is None

    def add(self, name: str, kind: str, z: Any, a: Any, shape_g: Callable[[Any], Any],
            block: int = 0, also: tuple[str, ...] = ()) -> None:
        self.capture.uses.append(Use(name, (name, block), kind, z, a, shape_g, also, self.op,
                                     int(z._version)))

    def linear(self, x: Any, weight: Any, bias: Any) -> Any:
        """``F.linear(x, weight, bias)``, recorded as a dense use (:func:`linear_record`);
        how the attention decomposition records its projections."""
        return linear_record(self, x, weight, bias)


def recorder(ids: dict[int, str], n: int) -> Any:
    """A fresh torch function mode recording uses of the parameters in ``ids``."""
    import torch
    from torch.overrides import TorchFunctionMode

    from .views import SCALED_OK, view_rules

    rules = _rules()
    rules.update(view_rules())

    class _Mode(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.rec = UseRecorder(ids, n)

        def __torch_function__(self, func: Any, types: Any, args: Any = (),
                               kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            rule = rules.get(func)
            if rule is not None:
                self.rec.op = getattr(func, "__name__", "")
                if rule not in SCALED_OK:
                    self.rec.taint_scaled(args, kwargs)
                done, out = rule(self.rec, func, args, kwargs)
                if done:
                    return out
            if not _is_metadata(func):
                self.rec.taint_all(args, kwargs)
            return func(*args, **kwargs)

    del torch
    return _Mode()


def _is_metadata(func: Any) -> bool:
    name = getattr(func, "__name__", "")
    if name == "__get__":
        prop = getattr(getattr(func, "__self__", None), "__name__", "")
        return prop not in _UNSAFE_PROPERTIES
    return name in _METADATA


def _rules() -> dict[Any, Callable[..., tuple[bool, Any]]]:
    import torch
    import torch.nn.functional as F

    from .matmul import addmm, matmul
    from .norms import batch_norm, group_norm, layer_norm, rms_norm
    from .views import add, mul

    table: dict[Any, Callable[..., tuple[bool, Any]]] = {
        F.linear: _linear, F.conv1d: _conv, F.conv2d: _conv, F.embedding: _embedding,
        F.layer_norm: layer_norm, F.group_norm: group_norm, F.batch_norm: batch_norm,
        F.multi_head_attention_forward: _mha,
        torch.addmm: addmm, torch.Tensor.addmm: addmm,
        torch.matmul: matmul, torch.Tensor.matmul: matmul, torch.Tensor.__matmul__: matmul,
        torch.add: add, torch.Tensor.add: add, torch.Tensor.__add__: add,
        torch.Tensor.__radd__: add, torch.Tensor.add_: add, torch.Tensor.__iadd__: add,
        torch.mul: mul, torch.Tensor.mul: mul, torch.Tensor.__mul__: mul,
        torch.Tensor.__rmul__: mul, torch.Tensor.mul_: mul, torch.Tensor.__imul__: mul,
    }
    if hasattr(F, "rms_norm"):
        table[F.rms_norm] = rms_norm
    return table


# ------------------------------------------------------------------------------ rules
_NOT_MINE = (False, None)


def _bias_use(rec: UseRecorder, bias: Any, z: Any, reduce_dims: Callable[[Any], Any]) -> None:
    name = rec.param(bias)
    if name is not None:
        rec.add(name, "direct", z, None, reduce_dims)


def linear_record(rec: UseRecorder, x: Any, weight: Any, bias: Any) -> Any:
    """``F.linear`` with recording (also used by the attention decomposition)."""
    import torch.nn.functional as F

    out = F.linear(x, weight, bias)
    w_name, b_name = rec.param(weight), rec.param(bias)
    if not rec.batched(x) or x.dim() < 2:
        for nm in (w_name, b_name):
            if nm is not None:
                rec.capture.tainted.add(nm)
        return out
    n, d_in, d_out = rec.n, int(weight.shape[1]), int(weight.shape[0])
    if w_name is not None:
        a = x.detach().reshape(n, -1, d_in)
        also: tuple[str, ...] = ()
        if b_name is not None:  # fold the bias in: [W b] acting on [a 1]
            a, also = _with_ones(a), (b_name,)
        rec.add(w_name, "dense", out, a, lambda g: g.reshape(g.shape[0], g.shape[1], -1, d_out),
                also=also)
    else:
        _bias_use(rec, bias, out, lambda g: g.reshape(g.shape[0], g.shape[1], -1, d_out).sum(2))
    return out


def _with_ones(a: Any) -> Any:
    import torch

    return torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)


def _linear(rec: UseRecorder, func: Any, args: Any, kwargs: Any) -> tuple[bool, Any]:
    b = bind_arguments(args, kwargs, ("input", "weight", "bias"), {"bias": None})
    if rec.param(b["input"]) is not None:
        return _NOT_MINE
    return True, linear_record(rec, b["input"], b["weight"], b["bias"])


def _conv(rec: UseRecorder, func: Any, args: Any, kwargs: Any) -> tuple[bool, Any]:
    import torch.nn.functional as F

    b = bind_arguments(args, kwargs, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
              {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1})
    x, weight, bias = b["input"], b["weight"], b["bias"]
    w_name = rec.param(weight)
    if (not rec.batched(x) or rec.param(x) is not None
            or x.dim() != weight.dim()):  # unbatched conv input
        return _NOT_MINE
    out = func(*args, **kwargs)
    spatial = weight.dim() - 2
    c_out, groups = int(weight.shape[0]), int(b["groups"])
    if w_name is not None:
        cols = _unfold(x.detach(), tuple(weight.shape[2:]), b["stride"], b["padding"],
                       b["dilation"], spatial)  # (n, C_in·k, L)
        per_group = cols.shape[1] // groups
        rows = c_out // groups
        b_name = rec.param(bias)
        for j in range(groups):
            a = cols[:, j * per_group:(j + 1) * per_group].transpose(1, 2)
            also: tuple[str, ...] = ()
            if b_name is not None:
                a, also = _with_ones(a), (b_name,)
            rec.add(w_name, "dense", out, a, _conv_g(rows, j), block=j, also=also)
    else:
        _bias_use(rec, bias, out, lambda g: g.reshape(g.shape[0], g.shape[1], c_out, -1).sum(3))
    del F
    return True, out


def _conv_g(rows: int, j: int) -> Callable[[Any], Any]:
    def shape(g: Any) -> Any:
        g = g.reshape(g.shape[0], g.shape[1], g.shape[2], -1)[:, :, j * rows:(j + 1) * rows]
        return g.transpose(2, 3)

    return shape


def _tuple(v: Any, k: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * k


def _unfold(x: Any, kernel: tuple[int, ...], stride: Any, padding: Any, dilation: Any,
            spatial: int) -> Any:
    """Convolution patches ``(n, C·Πk, L)`` in the weight's ``(C, k…)`` order."""
    import torch.nn.functional as F

    dil = _tuple(dilation, spatial)
    if isinstance(padding, str):
        if padding == "valid":
            pads = [(0, 0)] * spatial
        else:  # "same": total d(k-1), the extra one on the right (as torch does)
            pads = [((d * (k - 1)) // 2, d * (k - 1) - (d * (k - 1)) // 2) for k, d in zip(kernel, dil)]
    else:
        pads = [(p, p) for p in _tuple(padding, spatial)]
    flat = [v for pair in reversed(pads) for v in pair]
    if any(flat):
        x = F.pad(x, flat)
    st: tuple[int, ...]
    if spatial == 1:
        x = x.unsqueeze(2)
        kernel, dil, st = (1, kernel[0]), (1, dil[0]), (1, _tuple(stride, 1)[0])
    else:
        st = _tuple(stride, 2)
    return F.unfold(x, kernel, dilation=dil, padding=0, stride=st)


def _embedding(rec: UseRecorder, func: Any, args: Any, kwargs: Any) -> tuple[bool, Any]:
    b = bind_arguments(args, kwargs, ("input", "weight", "padding_idx", "max_norm", "norm_type",
                             "scale_grad_by_freq", "sparse"),
              {"padding_idx": None, "max_norm": None, "scale_grad_by_freq": False})
    idx, weight = b["input"], b["weight"]
    name = rec.param(weight)
    if (name is None or b["max_norm"] is not None or b["scale_grad_by_freq"]
            or idx.dim() < 1 or int(idx.shape[0]) != rec.n):
        return _NOT_MINE
    out = func(*args, **kwargs)
    ids = idx.detach().reshape(rec.n, -1).to(dtype=idx.dtype)
    pad = b["padding_idx"]
    if pad is not None:
        pad = pad if pad >= 0 else int(weight.shape[0]) + pad
        ids = ids.masked_fill(ids == pad, -1)
    d = int(weight.shape[1])
    rec.add(name, "embedding", out, ids, lambda g: g.reshape(g.shape[0], g.shape[1], -1, d))
    return True, out


def _mha(rec: UseRecorder, func: Any, args: Any, kwargs: Any) -> tuple[bool, Any]:
    from .attention import decomposed_mha

    return decomposed_mha(rec, args, kwargs)


# ------------------------------------------------------------------------------ capture
def forward_capture(prep: Prepared, x: Any, output: OutputSelector | None, n: int) -> tuple[Any, Any]:
    """One batched forward pass under the recorder; returns ``(outputs (n, O), capture)``."""
    import torch

    leaves = {k: v.detach().requires_grad_(True) for k, v in prep.params.items()}
    mode = recorder({id(t): k for k, t in leaves.items()}, n)
    with torch.enable_grad():
        with mode:
            raw = fcall(prep.module, {**prep.constants, **leaves}, x)
        out = select_output(raw, output).reshape(n, -1)
    cap = mode.rec.capture
    for u in cap.uses:
        if int(u.z._version) != u.version:  # overwritten in place after the recorded op
            cap.tainted.update(u.names)
    return out, cap


def structured_names(cap: Capture, excluded: set[str] | frozenset[str] = frozenset()) -> frozenset[str]:
    """Parameters every use of which has a rule, consistently.

    A parameter is out when it is tainted or ``excluded``, when its uses need different
    rules, or when it shares a use with a parameter that is out (a bias folded into a
    weight).
    """
    bad = set(cap.tainted) | _mixed(cap.uses) | set(excluded)
    bad |= {name for name, chains in cap.views.items() if len(chains) > 1}
    changed = True
    while changed:
        changed = False
        for u in cap.uses:
            names = set(u.names)
            if names & bad and not names <= bad:
                bad |= names
                changed = True
    return frozenset(n for u in cap.uses for n in u.names) - bad


#: Ops whose weight is stored ``(d_in, d_out)`` (:mod:`cvcore.backends.torch.matmul`): a
#: weight used both ways (``F.linear(x, W)`` and ``x @ W``) has no rule.
_TRANSPOSED = frozenset({"addmm", "matmul", "__matmul__"})


def _mixed(uses: list[Any]) -> set[str]:
    """Parameters whose uses need different rules (a square weight used by ``F.linear``
    and by ``x @ W``, an embedding also used by a rule other than ``F.linear``): the
    Jacobian path measures them."""
    seen: dict[tuple[tuple[str, int], str], tuple[Any, ...]] = {}
    bad: set[str] = set()
    for u in uses:
        sig = (u.kind, u.also) if u.a is None else (u.kind, u.also, u.a.dim(), tuple(u.a.shape[2:]),
                                                      u.op in _TRANSPOSED)
        if seen.setdefault((u.key, u.kind), sig) != sig:
            bad.add(u.name)
    names_by_kind: dict[str, set[str]] = {}
    for u in uses:
        for name in u.names:
            names_by_kind.setdefault(name, set()).add(u.kind + ("+" if name != u.name else ""))
    bad.update(k for k, kinds in names_by_kind.items()
               if len(kinds) > 1 and not (kinds == {"embedding", "dense"} and _tied(k, uses)))
    return bad


def _tied(name: str, uses: list[Any]) -> bool:
    """Whether a weight read by ``F.embedding`` is also used only as ``F.linear``'s weight,
    without a folded bias: a tied embedding (the ``tied`` rule of
    :mod:`cvcore.backends.torch.rules`)."""
    return all(u.op == "linear" and not u.also and u.key[1] == 0
               for u in uses if u.name == name and u.kind == "dense")
