"""Weights stored ``(d_in, d_out)`` in the structured torch engine: ``torch.addmm`` (GPT-2's
``Conv1D``, on the batch flattened to rows) and ``x @ W``.

Every kernel is checked in float64 against explicit per-sample ``torch.autograd.grad``
loops, each sample run alone (sequences unpadded), under ``implementation="structured"``
and ``"auto"``, and through the diagonal path (``variables=["trace"]``). The adversarial
modules flatten their batch so that the rows are *not* sample-major, or feed ``addmm`` a
buffer whose row count is a multiple of the batch: the row checks must send those weights
to the Jacobian path, and the kernel must stay exact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
nn = torch.nn

import cvcore
from cvcore.api import build, make_request
from tests.tolerance import rel_error as rel

transformers.logging.set_verbosity_error()
IMPLEMENTATIONS = ("structured", "auto")
VOCAB = 50
LENGTHS = [5, 3, 2, 4]


def jacobian_rows(one: Callable[[int], Any], n: int, params: list[Any]) -> np.ndarray:
    """``J`` ``(n, O, P)`` from one ``autograd.grad`` per sample (all its outputs at once,
    ``is_grads_batched``), ``one(i)`` being sample i's outputs computed alone."""
    rows = []
    for i in range(n):
        out = one(i).reshape(-1)
        eye = torch.eye(out.numel(), dtype=out.dtype)  # every output's gradient in one call
        g = torch.autograd.grad(out, params, grad_outputs=eye, is_grads_batched=True,
                                allow_unused=True, retain_graph=True)
        rows.append(torch.cat([(gi if gi is not None else torch.zeros(out.numel(), *p.shape,
                                                                     dtype=out.dtype))
                               .reshape(out.numel(), -1) for gi, p in zip(g, params)], dim=1))
    return torch.stack(rows).detach().numpy()


def traced_reference(one: Callable[[int], Any], n: int, params: list[Any]) -> np.ndarray:
    """``(1/O) Σ_o J_io · J_jo`` (:func:`jacobian_rows`)."""
    j = jacobian_rows(one, n, params)
    return np.einsum("iop,jop->ij", j, j) / j.shape[1]


def rules_of(model: Any, inputs: Any, **kw: Any) -> dict[str, str]:
    req = make_request(dtype="float64", implementation="structured", **kw)
    return dict(build(model, inputs, request=req).result.rules)


def check(model: Any, inputs: Any, ref: np.ndarray, **kw: Any) -> None:
    for impl in IMPLEMENTATIONS:
        k = cvcore.ntk(model, inputs, dtype="float64", implementation=impl, **kw)
        assert k.shape == ref.shape
        assert rel(k, ref) < 1e-10, impl
        trace = cvcore.measure(model, inputs, dtype="float64", implementation=impl,
                               variables=["trace"], **kw).trace
        assert trace == pytest.approx(float(np.trace(ref)), rel=1e-10), impl


# ----------------------------------------------------------------------------- GPT-2
@pytest.fixture(scope="module")
def gpt() -> Any:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB,
                                     n_positions=16, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).double().eval()


@pytest.fixture(scope="module")
def seqs() -> list[Any]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(1, VOCAB, (n,), generator=g) for n in LENGTHS]


def padded(seqs: list[Any], side: str, pad: int) -> dict[str, Any]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, span], mask[i, span] = s, 1
    return {"input_ids": ids, "attention_mask": mask}


def gpt_reference(model: Any, seqs: list[Any], output: str) -> np.ndarray:
    params = [p for p in model.parameters() if p.requires_grad]
    outs: list[Any] = []
    for s in seqs:
        logits = model(input_ids=s[None]).logits[0]
        if output == "last":
            outs.append(logits[-1])
        elif output == "next-token":
            outs.append(torch.log_softmax(logits[-2], -1)[s[-1]].reshape(1))
        else:  # positions: every token of every sequence is a sample
            outs.extend(logits[t] for t in range(len(s)))
    return traced_reference(lambda i: outs[i], len(outs), params)


def test_gpt2_conv1d_weights_take_the_addmm_rule(gpt, seqs) -> None:  # type: ignore[no-untyped-def]
    rules = rules_of(gpt, padded(seqs, "right", 0), output="next-token")
    conv1d = [f"model.transformer.h.{i}.{m}.{p}" for i in range(2)
              for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
              for p in ("weight", "bias")]
    assert {rules.get(name) for name in conv1d} == {"addmm (dense)"}
    assert rules["model.transformer.wte.weight"] == "embedding + linear (tied)"
    assert len(rules) == sum(1 for _ in gpt.parameters())  # no parameter left to the Jacobian path


def test_gpt2_full_kernel_of_the_last_logits(gpt, seqs) -> None:  # type: ignore[no-untyped-def]
    """The full (N·O × N·O) kernel: the tied embedding's cross terms between outputs."""
    params = [p for p in gpt.parameters() if p.requires_grad]
    j = jacobian_rows(lambda i: gpt(input_ids=seqs[i][None]).logits[0, -1], len(seqs), params)
    flat = j.reshape(-1, j.shape[2])
    ref = flat @ flat.T
    for impl in IMPLEMENTATIONS:
        k = cvcore.ntk(gpt, padded(seqs, "left", 7), dtype="float64", implementation=impl,
                       kernel="full")
        assert rel(k, ref) < 1e-10, impl


@pytest.mark.parametrize("output", ["next-token", "last", "positions"])
def test_gpt2_kernel_matches_unpadded_loops(gpt, seqs, output) -> None:  # type: ignore[no-untyped-def]
    ref = gpt_reference(gpt, seqs, output)
    for side, pad in [("right", 0), ("left", 7)]:
        check(gpt, padded(seqs, side, pad), ref, output=output)


# ------------------------------------------------------------- hand-written modules
class FlatAddmm(nn.Module):
    """``addmm`` on the batch flattened sample-major, with ``alpha`` and ``beta``, then
    ``x @ W`` on 3-d rows and on flattened rows."""

    def __init__(self, d_in: int = 5, width: int = 6) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d_in, width))
        self.b = nn.Parameter(torch.randn(width))
        self.v = nn.Parameter(torch.randn(width, width))
        self.u = nn.Parameter(torch.randn(width, 3))

    def forward(self, x: Any) -> Any:
        n, t, d = x.shape
        h = torch.addmm(self.b, x.reshape(-1, d), self.w, beta=0.5, alpha=2.0)
        h = torch.tanh(h).view(n, t, -1)
        h = torch.sin(h @ self.v)  # (n, t, width) @ (width, width)
        flat = torch.matmul(h.reshape(n * t, -1), self.u).view(n, t, -1)
        return flat.mean(1)


class TimeMajor(nn.Module):
    """The batch flattened time-major (``x.transpose(0, 1)``): rows are not samples'."""

    def __init__(self, d_in: int = 5, width: int = 4) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d_in, width))
        self.b = nn.Parameter(torch.randn(width))
        self.head = nn.Linear(width, 2)

    def forward(self, x: Any) -> Any:
        n, t, d = x.shape
        h = torch.addmm(self.b, x.transpose(0, 1).reshape(-1, d), self.w)
        h = h.reshape(t, n, -1).transpose(0, 1)
        return self.head(torch.tanh(h).sum(1))


class BufferRows(nn.Module):
    """``addmm`` on a 20-row buffer (a multiple of N = 10 and of N = 20), averaged in."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 3)
        self.w = nn.Parameter(torch.randn(4, 3))
        self.b = nn.Parameter(torch.randn(3))
        self.register_buffer("table", torch.randn(20, 4))

    def forward(self, x: Any) -> Any:
        return self.head(x) * torch.addmm(self.b, self.table, self.w).mean(0)


def test_flattened_addmm_and_matmul_match_per_sample_loops() -> None:
    torch.manual_seed(5)
    model = FlatAddmm().double().eval()
    x = torch.randn(6, 4, 5, dtype=torch.float64)
    params = list(model.parameters())
    ref = traced_reference(lambda i: model(x[i:i + 1]), 6, params)
    check(model, x, ref)
    rules = rules_of(model, x)
    assert rules == {"w": "addmm (dense)", "b": "addmm (dense)", "v": "matmul (dense)",
                     "u": "matmul (dense)"}


def test_time_major_flatten_goes_to_the_jacobian_path() -> None:
    torch.manual_seed(6)
    model = TimeMajor().double().eval()
    x = torch.randn(8, 3, 5, dtype=torch.float64)
    ref = traced_reference(lambda i: model(x[i:i + 1]), 8, list(model.parameters()))
    check(model, x, ref)
    rules = rules_of(model, x)
    assert "w" not in rules and "b" not in rules
    assert rules["head.weight"] == "linear (dense)"


@pytest.mark.parametrize("n", [10, 20])
def test_addmm_on_a_buffer_with_a_multiple_of_the_batch_rows(n: int) -> None:
    torch.manual_seed(7)
    model = BufferRows().double().eval()
    x = torch.randn(n, 4, dtype=torch.float64)
    ref = traced_reference(lambda i: model(x[i:i + 1]), n, list(model.parameters()))
    check(model, x, ref)
    rules = rules_of(model, x)
    assert "w" not in rules and "b" not in rules
    assert rules["head.weight"] == "linear (dense)"


def test_weight_used_by_linear_and_by_matmul_has_no_rule() -> None:
    """A square weight used as ``F.linear(x, W)`` and as ``x @ W``: its two gradients are
    transposes of each other, so no one feature measures it."""

    class Both(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x: Any) -> Any:
            return torch.tanh(nn.functional.linear(x, self.w)) @ self.w

    torch.manual_seed(8)
    model = Both().double().eval()
    x = torch.randn(6, 4, dtype=torch.float64)
    ref = traced_reference(lambda i: model(x[i:i + 1]), 6, list(model.parameters()))
    check(model, x, ref)
    assert "w" not in rules_of(model, x)


def test_tied_rule_in_chunks_is_the_same(gpt, seqs, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Every chunked loop of the rules (the tied cross term's included) at one item a chunk."""
    from cvcore.backends.torch import rules

    x = padded(seqs, "right", 0)
    whole = cvcore.ntk(gpt, x, dtype="float64", implementation="structured", kernel="full")
    monkeypatch.setattr(rules, "_chunk", lambda total, per_item, budget: 1)
    chunked = cvcore.ntk(gpt, x, dtype="float64", implementation="structured", kernel="full")
    assert rules_of(gpt, x)["model.transformer.wte.weight"] == "embedding + linear (tied)"
    assert rel(chunked, whole) < 1e-12
