"""The PyTorch backend against explicit per-sample, per-output autograd loops."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import cvcore
from cvcore.errors import InputError, ModelError
from tests import torch_models as tm
from tests.tolerance import rel_error as rel

CASES = {
    "mlp": (lambda: tm.mlp(), lambda: torch.randn(7, 6)),
    "cnn": (tm.SmallCNN, lambda: torch.randn(5, 1, 6, 6)),
    "layernorm-gelu": (tm.NormGelu, lambda: torch.randn(6, 5)),
    "batchnorm-eval": (tm.batchnorm_net, lambda: torch.randn(6, 5)),
}


@pytest.fixture(params=sorted(CASES), ids=sorted(CASES))
def case(request: pytest.FixtureRequest):
    torch.manual_seed(0)
    make_model, make_x = CASES[request.param]
    return make_model(), make_x()


def test_full_and_traced_match_autograd_reference_float64(case) -> None:
    model, x = case
    ref = tm.reference_full(model.double(), x.double()).numpy()
    full = cvcore.ntk(model, x, kernel="full", dtype="float64", device="cpu")
    assert full.dtype == np.float64
    assert rel(full, ref) < 1e-10
    traced = cvcore.ntk(model, x, dtype="float64", device="cpu")
    assert rel(traced, tm.traced_from_full(torch.from_numpy(ref), x.shape[0]).numpy()) < 1e-10


def test_float32_within_1e4(case) -> None:
    model, x = case
    ref = tm.reference_full(model.double(), x.double()).numpy()
    full32 = cvcore.ntk(model.float(), x.float(), kernel="full", dtype="float32", device="cpu")
    assert full32.dtype == np.float32
    assert rel(full32.astype(np.float64), ref) < 1e-4


def test_blocked_equals_unblocked_with_small_budget(case) -> None:
    model, x = case
    whole = cvcore.ntk(model, x, kernel="full", dtype="float64", device="cpu")
    for budget in (64, 2048):  # down to one sample and one tensor at a time
        blocked = cvcore.ntk(model, x, kernel="full", dtype="float64", device="cpu",
                             memory_budget=budget)
        assert rel(blocked, whole) < 1e-12
    traced = cvcore.ntk(model, x, dtype="float64", memory_budget=64)
    assert rel(traced, cvcore.ntk(model, x, dtype="float64")) < 1e-12


def test_model_is_left_as_it_was() -> None:
    model = tm.batchnorm_net().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cvcore.ntk(model, torch.randn(4, 5), dtype="float64")
    assert model.training
    assert all(next(model.parameters()).dtype == torch.float32 for _ in [0])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_eval_mode_by_default_and_train_mode_on_request() -> None:
    torch.manual_seed(1)
    model = tm.batchnorm_net()
    x = torch.randn(6, 5, dtype=torch.float64)
    evaluated = cvcore.ntk(model, x, dtype="float64")
    assert rel(evaluated, tm.traced_from_full(tm.reference_full(model.double(), x), 6).numpy()) < 1e-10
    trained = cvcore.ntk(model, x, dtype="float64", train=True)
    # Reference for train mode: Jacobian of the whole batch (batch statistics couple samples).
    model.train()
    params = list(model.parameters())
    out = model(x)
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[i, o], params, retain_graph=True)])
            for i in range(6) for o in range(2)]
    j = torch.stack(rows)
    ref = tm.traced_from_full(j @ j.T, 6).numpy()
    assert rel(trained, ref) < 1e-10
    assert rel(trained, evaluated) > 1e-3


def test_frozen_parameters_are_excluded() -> None:
    torch.manual_seed(2)
    model = tm.mlp().double()
    model[0].weight.requires_grad_(False)
    x = torch.randn(5, 6, dtype=torch.float64)
    ref = tm.reference_full(model, x).numpy()  # the reference skips frozen parameters too
    assert rel(cvcore.ntk(model, x, kernel="full", dtype="float64"), ref) < 1e-10


@pytest.mark.parametrize("selector", [0, lambda out: out[0]], ids=["index", "callable"])
def test_tuple_output_selection(selector) -> None:
    torch.manual_seed(3)
    model = tm.TupleOut().double()
    x = torch.randn(4, 5, dtype=torch.float64)
    ref = tm.reference_full(model, x, select=lambda out: out[0]).numpy()
    assert rel(cvcore.ntk(model, x, kernel="full", dtype="float64", output=selector), ref) < 1e-10
    with pytest.raises(ModelError, match=r"tuple of 2 items \(indices 0..1\)"):
        cvcore.ntk(model, x)


def test_dataclass_and_dict_outputs() -> None:
    torch.manual_seed(4)
    model = tm.DataclassOut().double()
    x = torch.randn(4, 5, dtype=torch.float64)
    ref = tm.reference_full(model, x, select=lambda out: out.hidden).numpy()
    assert rel(cvcore.ntk(model, x, kernel="full", dtype="float64", output="hidden"), ref) < 1e-10
    with pytest.raises(ModelError, match=r"fields \['logits', 'hidden'\]"):
        cvcore.ntk(model, x)


def test_several_inputs_as_tuple_and_dict() -> None:
    torch.manual_seed(5)
    model = tm.TwoInputs().double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    ref = tm.reference_full(model, (x, y)).numpy()
    assert rel(cvcore.ntk(model, (x, y), kernel="full", dtype="float64"), ref) < 1e-10
    as_dict = cvcore.ntk(model, {"x": x.numpy(), "y": y.numpy()}, kernel="full", dtype="float64")
    assert rel(as_dict, ref) < 1e-10


def test_numpy_inputs_and_n_not_a_multiple_of_anything() -> None:
    torch.manual_seed(6)
    model = tm.mlp().double()
    x = np.random.default_rng(0).standard_normal((11, 6))
    ref = tm.reference_full(model, torch.from_numpy(x)).numpy()
    assert rel(cvcore.ntk(model, x, kernel="full", dtype="float64", memory_budget=3000), ref) < 1e-10


def test_torchscript_takes_the_slow_path() -> None:
    torch.manual_seed(7)
    model = tm.mlp().double()
    x = torch.randn(4, 6, dtype=torch.float64)
    ref = tm.reference_full(model, x).numpy()
    scripted = torch.jit.script(model)
    assert rel(cvcore.ntk(scripted, x, kernel="full", dtype="float64"), ref) < 1e-10


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic-batch", "static-batch"])
def test_exported_program(dynamic: bool) -> None:
    torch.manual_seed(8)
    model = tm.mlp()
    x = torch.randn(4, 6)
    shapes = {"input": {0: torch.export.Dim("batch", min=1)}} if dynamic else None
    program = torch.export.export(model, (x,), dynamic_shapes=shapes)
    probe = torch.randn(7, 6, dtype=torch.float64)
    ref = tm.reference_full(model.double(), probe).numpy()
    assert rel(cvcore.ntk(program, probe, kernel="full", dtype="float64"), ref) < 1e-10


def test_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(InputError, match=r"per-sample shape \(5,\).*6x12|per-sample shape \(5,\)"):
        cvcore.ntk(tm.mlp(), torch.randn(3, 5))


def test_no_trainable_parameters_and_nan_weights() -> None:
    model = tm.mlp()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ModelError, match="trainable parameters"):
        cvcore.ntk(model, torch.randn(3, 6))
    model = tm.mlp()
    with torch.no_grad():
        model[2].bias[0] = float("nan")
    with pytest.raises(ModelError, match="NaN or Inf in parameter '2.bias'"):
        cvcore.ntk(model, torch.randn(3, 6))


def test_nan_outputs_name_the_samples() -> None:
    x = torch.randn(5, 6)
    x[3, 0] = float("inf")
    with pytest.raises(ModelError, match=r"1 of 5 samples \(indices 3\)"):
        cvcore.ntk(tm.mlp(), x)


def test_measure_gives_collective_variables() -> None:
    torch.manual_seed(9)
    model = tm.mlp().double()
    x = torch.randn(6, 6, dtype=torch.float64)
    cv = cvcore.measure(model, x, dtype="float64")
    k = tm.traced_from_full(tm.reference_full(model, x), 6).numpy()
    lam = np.linalg.eigvalsh(k)
    p = lam / lam.sum()
    assert cv.trace == pytest.approx(np.trace(k), rel=1e-10)
    assert cv.entropy == pytest.approx(-(p * np.log(p)).sum(), rel=1e-8)


def test_default_device_is_cpu_without_gpu() -> None:
    from cvcore.backends.torch.setup import resolve_device

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None) == expected
    with pytest.raises(InputError, match="torch device"):
        resolve_device("gpu0")


@pytest.mark.parametrize("kernel", ["traced", "full"])
def test_many_outputs_are_blocked_over_outputs(kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from cvcore.blocking import BlockPlan

    seen: list[int] = []
    original = BlockPlan.output_blocks

    def spy(self, group):
        blocks = original(self, group)
        seen.append(len(blocks))
        return blocks

    monkeypatch.setattr(BlockPlan, "output_blocks", spy)
    torch.manual_seed(10)
    model = tm.mlp(6, 8, 40).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    ref = tm.reference_full(model, x)
    expected = (ref if kernel == "full" else tm.traced_from_full(ref, 4)).numpy()
    got = cvcore.ntk(model, x, kernel=kernel, dtype="float64", implementation="jacobian",
                     memory_budget=120_000)
    assert max(seen) > 1  # the outputs really were split
    assert rel(got, expected) < 1e-12
