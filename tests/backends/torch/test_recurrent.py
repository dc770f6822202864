"""Recurrent layers (LSTM, GRU, RNN) in eval mode against per-sample gradients.

``nn.GRU`` / ``nn.RNN`` broadcast their hidden state in place inside a fused ``_VF``
kernel, which ``torch.func.vmap`` refuses ("output with shape [1, 24] doesn't match the
broadcast shape [40, 1, 24]"); the backend then differentiates one sample at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import cvcore
from tests import torch_models as tm
from tests.backends.torch.test_row_soundness import per_sample_kernel, rel

CASES = [(cell, bf, layers, bi) for cell in ("LSTM", "GRU", "RNN") for bf in (True, False)
         for layers, bi in ((1, False), (2, True))]


@pytest.mark.parametrize(("cell", "batch_first", "layers", "bidirectional"), CASES,
                         ids=[f"{c}-{'bf' if b else 'sf'}-{n}{'-bi' if d else ''}" for c, b, n, d in CASES])
def test_recurrent_matches_per_sample_gradients(cell: str, batch_first: bool, layers: int,
                                               bidirectional: bool) -> None:
    torch.manual_seed(5)
    model = tm.Recurrent(cell, batch_first, layers, bidirectional).double().eval()
    x = torch.randn(6, 64, dtype=torch.float64)
    ref = per_sample_kernel(model, lambda i: model(x[i:i + 1]), 6)
    for impl in ("auto", "jacobian"):
        assert rel(cvcore.ntk(model, x, dtype="float64", implementation=impl), ref) < 1e-9, impl
    trace = cvcore.measure(model, x, dtype="float64", variables=["trace"]).trace
    assert trace == pytest.approx(np.trace(ref), rel=1e-9)


def test_pickled_gru_through_the_cli(tmp_path: Path) -> None:
    from cvcore.cli.app import make_app
    from typer.testing import CliRunner

    from cvcore.data_io import load_bundled

    torch.manual_seed(6)
    model = tm.Recurrent("GRU", hidden=24)
    torch.save(model, tmp_path / "gru.pt")
    result = CliRunner().invoke(make_app(), ["measure", str(tmp_path / "gru.pt"), "--data", "digits",
                                             "--samples", "8", "--dtype", "float64", "--json"])
    assert result.exit_code == 0, result.stderr
    (row,) = json.loads(result.stdout)
    x, _ = load_bundled("digits")
    probe = x[np.sort(np.random.default_rng(0).choice(len(x), 8, replace=False))]
    ref = per_sample_kernel(model.double().eval(), lambda i: model(torch.from_numpy(probe[i:i + 1]).double()), 8)
    assert row["trace"] == pytest.approx(np.trace(ref), rel=1e-9)
