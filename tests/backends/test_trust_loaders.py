"""What each loader may execute, and one-line errors for malformed files. Crafted files carry
a payload that creates a marker file when it runs: every refusal checks the marker's absence."""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import pickle
import shutil
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cvcore.cli.app import make_app
from typer.testing import CliRunner

from cvcore.checkpoints import load_checkpoint
from cvcore.errors import CVCoreError, InputError, UntrustedFileError
from cvcore.protocols import LoadOptions

torch = pytest.importorskip("torch")

runner = CliRunner()


def cv(*args: object):
    return runner.invoke(make_app(), [str(a) for a in args])


def one_line_exit_2(result) -> str:
    """The single stderr line of a refused command."""
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def single_line(exc: BaseException) -> str:
    assert "\n" not in str(exc).strip(), str(exc)
    return str(exc)


class Payload:
    """Unpickles to a call that creates ``target``."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.target!r}, 'w').close()",))



@pytest.fixture(scope="module")
def program(tmp_path_factory) -> tuple[Path, torch.nn.Module, torch.Tensor]:
    """A small exported program saved as ``m.pt2``, its eager model and example inputs."""
    path = tmp_path_factory.mktemp("pt2") / "m.pt2"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    example = torch.randn(5, 6)
    torch.export.save(torch.export.export(model, (example,)), str(path))
    return path, model, example


Edit = Callable[[bytes], bytes]


def rewrite(src: Path, dst: Path, replace: dict[str, bytes | Edit] | None = None,
            add: dict[str, bytes] | None = None) -> Path:
    """A copy of the archive ``src`` with members (paths under its root folder) replaced
    or added."""
    replace, add = replace or {}, add or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        root = zin.namelist()[0].split("/")[0]
        for info in zin.infolist():
            rel = info.filename[len(root) + 1:]
            new = replace.get(rel, zin.read(info.filename))
            zout.writestr(info.filename, new(zin.read(info.filename)) if callable(new) else new)
        for rel, data in add.items():
            zout.writestr(f"{root}/{rel}", data)
    return dst


def json_edit(edit: Callable[[dict], None]) -> Edit:
    def apply(raw: bytes) -> bytes:
        edit(doc := json.loads(raw))
        return json.dumps(doc).encode()
    return apply


def saved(obj: object) -> bytes:
    torch.save(obj, buf := io.BytesIO())
    return buf.getvalue()


def _pickled_weight(marker: Path) -> dict:
    def edit(doc: dict) -> None:
        doc["config"]["0.weight"]["use_pickle"] = True
    return {"data/weights/model_weights_config.json": json_edit(edit),
            "data/weights/weight_0": saved(Payload(marker))}


def _pickled_constant(marker: Path, name: str, use_pickle: bool) -> tuple[dict, dict]:
    def edit(doc: dict) -> None:
        doc["config"]["evil"] = {"path_name": name, "is_param": False,
                                 "use_pickle": use_pickle, "tensor_meta": None}
    payload = saved(Payload(marker)) if name.startswith("tensor_") else pickle.dumps(Payload(marker))
    return ({"data/constants/model_constants_config.json": json_edit(edit)},
            {f"data/constants/{name}": payload})


def _shape_expression(marker: Path) -> dict:
    code = f"__import__('os').system('touch {marker}')"

    def edit(doc: dict) -> None:
        sizes = doc["graph_module"]["graph"]["tensor_values"]["input"]["sizes"]
        sizes[0] = {"as_expr": {"expr_str": code, "hint": {"as_int": 5}}}
    return {"models/model.json": json_edit(edit)}


def _call_target(target: str) -> dict:
    def edit(doc: dict) -> None:
        for node in doc["graph_module"]["graph"]["nodes"]:
            if node["target"] == "torch.ops.aten.tanh.default":
                node["target"] = target
    return {"models/model.json": json_edit(edit)}


def crafted(kind: str, src: Path, dst: Path, marker: Path) -> Path:
    """An archive that runs code (or would) in one of the ways torch's reader allows."""
    if kind == "use_pickle-weight":
        return rewrite(src, dst, _pickled_weight(marker))
    if kind == "sample-inputs":
        return rewrite(src, dst, {"data/sample_inputs/model.pt": saved(((Payload(marker),), {}))})
    if kind in ("opaque-constant", "custom-object", "use_pickle-constant"):
        name, flag = {"opaque-constant": ("opaque_obj_0", True),
                      "custom-object": ("custom_obj_0", True),
                      "use_pickle-constant": ("tensor_9", True)}[kind]
        replace, add = _pickled_constant(marker, name, flag)
        return rewrite(src, dst, replace, add)
    if kind == "legacy-weights":
        return rewrite(src, dst, add={"data/weights/model.pt": saved({"w": Payload(marker)})})
    if kind == "aotinductor":
        return rewrite(src, dst, add={"data/aotinductor/model/model.so": b"\x7fELF"})
    if kind == "shape-expression":
        return rewrite(src, dst, _shape_expression(marker))
    target = {"autograd-import": "torch.export.custom_ops."
                                 "_call_custom_autograd_function_in_pre_dispatch",
              "from-file": "torch.ops.aten.from_file.default"}[kind]
    return rewrite(src, dst, _call_target(target))


#: Each way, and the words the refusal names it by.
PT2_ATTACKS = {
    "use_pickle-weight": "data/weights/weight_0 (0.weight), which torch would unpickle",
    "sample-inputs": "data/sample_inputs/model.pt, which torch would unpickle",
    "opaque-constant": "data/constants/opaque_obj_0",
    "custom-object": "data/constants/custom_obj_0",
    "use_pickle-constant": "data/constants/tensor_9 (evil), which torch would unpickle",
    "legacy-weights": "data/weights/model.pt",
    "aotinductor": "compiled code",
    "shape-expression": "torch would evaluate as Python",
    "autograd-import": "_call_custom_autograd_function_in_pre_dispatch",
    "from-file": "torch.ops.aten.from_file.default",
}


@pytest.mark.parametrize("kind", list(PT2_ATTACKS))
def test_crafted_pt2_is_refused_before_anything_runs(program, tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    path = crafted(kind, program[0], tmp_path / "x.pt2", marker)
    with pytest.raises(UntrustedFileError) as info:
        load_checkpoint(path, LoadOptions())
    message = single_line(info.value)
    assert PT2_ATTACKS[kind] in message and "--trust" in message
    assert "nothing was run" in message
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["use_pickle-weight", "sample-inputs", "opaque-constant",
                                  "shape-expression"])
def test_crafted_pt2_through_the_cli_and_renamed_pt(program, tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    path = crafted(kind, program[0], tmp_path / "x.pt2", marker)
    renamed = tmp_path / "x.pt"
    renamed.write_bytes(path.read_bytes())
    for target in (path, renamed):
        line = one_line_exit_2(cv("measure", target, "--data", "digits"))
        assert PT2_ATTACKS[kind] in line and "--trust" in line
    assert not marker.exists()


def test_these_payloads_do_run_in_torch_export_load(program, tmp_path: Path) -> None:
    """The crafted archives are real: torch's own reader runs their payloads."""
    for kind in ("use_pickle-weight", "sample-inputs", "opaque-constant", "shape-expression"):
        marker = tmp_path / f"ran-{kind}"
        path = crafted(kind, program[0], tmp_path / f"{kind}.pt2", marker)
        with contextlib.suppress(Exception):  # some fail after the payload ran
            torch.export.load(str(path))
        assert marker.exists(), kind


def test_plain_exported_program_loads_and_measures_like_the_eager_model(program) -> None:
    import cvcore

    path, model, example = program
    loaded = load_checkpoint(path, LoadOptions())
    assert torch.equal(loaded.example_inputs, example)
    got = cvcore.ntk(loaded.model, example, kernel="full", dtype="float64")
    want = cvcore.ntk(model, example, kernel="full", dtype="float64")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-10, atol=1e-12)


def test_trust_hands_the_archive_to_torch(program, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = crafted("sample-inputs", program[0], tmp_path / "x.pt2", marker)
    try:
        load_checkpoint(path, LoadOptions(trust=True))
    except CVCoreError:  # torch 2.13's fallback warning itself can fail to format
        pass
    assert marker.exists()  # the user vouched for it: torch's own reader ran


@pytest.mark.parametrize(("text", "ok"), [
    ("s0", True), ("2*s0 + Max(s1, 3) - FloorDiv(s0, 2)", True), ("u0 <= 1e3", True),
    ("__import__('os').system('x')", False), ("eval(chr(95))", False), ("s0.__class__", False),
    ("open(s0)", False), ("lambda: 1", False),
    ("op:torch.ops.aten.linear.default", True), ("op:_operator.getitem", True),
    ("op:torch.ops.higher_order.cond", True), ("op:torch.sym_max", True),
    ("op:torch.os.system", False), ("op:torch.ops.aten.from_file.default", False),
    ("op:torch.ops.aten._print.default", False), ("op:torch.ops.higher_order.print", False),
    ("op:torch.ops.higher_order.inline_asm_elementwise", False),
    ("op:torch.ops.myns.op.default", False), ("op:#custom:op", False), ("op:builtins.exec", False),
])
def test_shape_expressions_and_graph_targets_allowlists(text: str, ok: bool) -> None:
    from cvcore.backends.torch.export_archive import expression_allowed, target_allowed

    if text.startswith("op:"):
        assert target_allowed(text[3:]) is ok
    else:
        assert expression_allowed(text) is ok



def _saved_model(path: Path, body: str, marker: Path | None = None) -> Path:
    """A tf.Module SavedModel (64 inputs, 3 outputs) whose call runs ``body`` first."""
    tf = pytest.importorskip("tensorflow")

    class Net(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(tf.random.stateless_normal((64, 3), seed=(1, 2)))

        @tf.function(input_signature=[tf.TensorSpec([None, 64], tf.float32)])
        def __call__(self, x):
            if body == "write_file":
                tf.io.write_file(str(marker), "written")
            elif body == "read_file":
                tf.print(tf.io.read_file("/etc/hostname"))
            elif body == "print":
                tf.print(x)
            return tf.tanh(x @ self.w)

    tf.saved_model.save(Net(), str(path))
    return path


@pytest.mark.parametrize(("body", "op"), [("write_file", "WriteFile"), ("read_file", "ReadFile"),
                                          ("print", "PrintV2")])
def test_saved_model_with_side_effects_is_refused(tmp_path: Path, body: str, op: str) -> None:
    marker = tmp_path / "written-by-the-model"
    path = _saved_model(tmp_path / "sm", body, marker)
    with pytest.raises(UntrustedFileError) as info:
        load_checkpoint(path, LoadOptions())
    message = single_line(info.value)
    assert f"the op {op} in function __inference___call__" in message and "--trust" in message
    line = one_line_exit_2(cv("measure", path, "--data", "digits", "--samples", "4"))
    assert f"the op {op}" in line
    assert not marker.exists()


def test_saved_model_with_write_file_runs_it_with_trust(tmp_path: Path) -> None:
    marker = tmp_path / "written-by-the-model"
    path = _saved_model(tmp_path / "sm", "write_file", marker)
    load_checkpoint(path, LoadOptions(trust=True)).model(np.zeros((1, 64), np.float32))
    assert marker.exists()  # the user vouched for it: the model's own op ran


def test_plain_saved_model_and_keras_export_still_measure(tmp_path: Path) -> None:
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    import cvcore
    from cvcore.data_io import load_bundled, probe_subset

    path = _saved_model(tmp_path / "sm", "plain")
    result = cv("measure", path, "--data", "digits", "--samples", "6", "--seed", "0", "--json")
    assert result.exit_code == 0, result.stderr
    x = probe_subset(load_bundled("digits")[0], 6, seed=0)
    ref = cvcore.measure(tf.saved_model.load(str(path)), x)
    assert json.loads(result.stdout)[0]["trace"] == pytest.approx(ref.trace, rel=1e-6)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.LayerNormalization(), keras.layers.Dense(3)])
    model.export(str(tmp_path / "exported"), verbose=False)
    assert cvcore.measure(load_checkpoint(tmp_path / "exported", LoadOptions()).model, x).trace > 0


def test_function_reference_by_op_name_is_checked(tmp_path: Path) -> None:
    """A call whose function attribute names an op instead of a library function."""
    pytest.importorskip("tensorflow")
    from tensorflow.core.protobuf import saved_model_pb2

    path = _saved_model(tmp_path / "sm", "plain")
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((path / "saved_model.pb").read_bytes())
    graph = proto.meta_graphs[0].graph_def
    wrapper = next(f for f in graph.library.function if "signature_wrapper" in f.signature.name)
    call = next(n for n in wrapper.node_def if n.op == "StatefulPartitionedCall")
    call.attr["f"].func.name = "WriteFile"
    (path / "saved_model.pb").write_bytes(proto.SerializeToString())
    with pytest.raises(UntrustedFileError, match="the op WriteFile in function "):
        load_checkpoint(path, LoadOptions())


FACTORY = f"{Path(__file__).parents[1] / 'torch_models.py'}:digits_mlp"


def _safetensors_variants(tmp_path: Path) -> dict[str, Path]:
    """A valid safetensors file of digits_mlp's weights, broken in several ways."""
    from safetensors.torch import save_file

    from tests import torch_models as tm

    save_file(tm.digits_mlp().state_dict(), str(tmp_path / "good.safetensors"))
    raw = (tmp_path / "good.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, body = json.loads(raw[8:8 + n]), raw[8 + n:]
    first = next(k for k in header if k != "__metadata__")

    def variant(name: str, head: bytes | dict, length: int | None = None) -> Path:
        text = head if isinstance(head, bytes) else json.dumps(head).encode()
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + body)
        return path

    def edited(field: str, value: object) -> dict:
        return {**header, first: {**header[first], field: value}}

    return {
        "length-beyond-file": variant("length", header, length=10**12),
        "invalid-json": variant("json", b"{not json" + b" " * 24),
        "offsets-out-of-range": variant("offsets", edited("data_offsets", [0, 10**9])),
        "wrong-dtype": variant("dtype", edited("dtype", "F99")),
        "negative-shape": variant("shape", edited("shape", [-1, 64])),
        "header-not-object": variant("list", b"[1, 2, 3]"),
    }


def test_broken_safetensors_are_one_line(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    for name, path in _safetensors_variants(tmp_path).items():
        with pytest.raises(InputError) as info:
            load_checkpoint(path, LoadOptions(model_factory=FACTORY))
        assert str(path) in single_line(info.value), name
    line = one_line_exit_2(cv("measure", tmp_path / "offsets.safetensors", "--model", FACTORY,
                              "--data", "digits"))
    assert "expected a readable safetensors file" in line


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=16,
                                     max_position_embeddings=16)
    path = tmp_path_factory.mktemp("hf") / "bert"
    transformers.BertModel(config).save_pretrained(str(path))
    return path


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


@pytest.mark.parametrize(("config", "expected"), [
    (b'{"model_type": "bert", "hidden_size": "big"}',
     "expected a non-negative integer for 'hidden_size', got 'big'"),
    (b'{"model_type": "bert", "num_hidden_layers": -2}', "'num_hidden_layers', got -2"),
    (b"[1, 2]", "expected a JSON object (a transformers config), got a JSON list"),
    (b"{nope", "expected a JSON config"),
], ids=["string-size", "negative-count", "not-a-dict", "invalid-json"])
def test_bad_hugging_face_config_is_one_line(hf_dir: Path, tmp_path: Path, config: bytes,
                                             expected: str) -> None:
    path = _copy(hf_dir, tmp_path / "m")
    if config.startswith(b'{"model_type"'):
        full = json.loads((hf_dir / "config.json").read_text())
        full.update(json.loads(config))
        config = json.dumps(full).encode()
    (path / "config.json").write_bytes(config)
    with pytest.raises(InputError) as info:
        load_checkpoint(path, LoadOptions())
    assert expected in single_line(info.value)
    assert expected in one_line_exit_2(cv("measure", path, "--data", "digits"))


def test_broken_safetensors_in_a_hugging_face_directory(hf_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    variants = _safetensors_variants(tmp_path)
    for name in ("invalid-json", "offsets-out-of-range", "wrong-dtype"):
        path = _copy(hf_dir, tmp_path / name)
        (path / "model.safetensors").write_bytes(variants[name].read_bytes())
        with pytest.raises(InputError) as info:
            load_checkpoint(path, LoadOptions())
        assert "expected a save_pretrained directory BertModel can load" in single_line(info.value)
    assert "Error while deserializing header" in one_line_exit_2(
        cv("measure", tmp_path / "invalid-json", "--data", "digits"))


def test_unsafe_bin_weights_are_refused_without_advice_to_unpickle(hf_dir: Path,
                                                                   tmp_path: Path) -> None:
    from safetensors.torch import load_file

    marker = tmp_path / "pwned"
    path = _copy(hf_dir, tmp_path / "bin")
    state: dict[str, object] = dict(load_file(str(path / "model.safetensors")))
    state["evil"] = Payload(marker)
    (path / "model.safetensors").unlink()
    torch.save(state, path / "pytorch_model.bin")
    with pytest.raises(UntrustedFileError) as info:
        load_checkpoint(path, LoadOptions())
    message = single_line(info.value)
    assert "builtins.exec" in message or "exec" in message
    assert "safetensors" in message and "--trust" in message
    assert "weights_only=False" not in message and "weights_only" not in message
    line = one_line_exit_2(cv("measure", path, "--data", "digits"))
    assert "weights_only" not in line and not marker.exists()
    load_checkpoint(path, LoadOptions(trust=True))
    assert marker.exists()  # with --trust the user's own file is read as it is


def _npy_header(shape: tuple[int, ...], descr: str = "<f8") -> bytes:
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}"
    text += " " * (118 - len(text)) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode()


def test_npy_header_claiming_29_tib_is_refused_before_allocating(tmp_path: Path) -> None:
    from cvcore.data_io import load_data, read_kernel

    bomb = tmp_path / "bomb.npy"
    bomb.write_bytes(_npy_header((2_000_000, 2_000_000)) + b"\0" * 64)
    with pytest.raises(InputError) as info:
        load_data(str(bomb))
    message = single_line(info.value)
    assert "declaring shape (2000000, 2000000)" in message and "32000000000000 bytes" in message
    with pytest.raises(InputError, match="declaring shape"):
        read_kernel(bomb)
    archive = tmp_path / "bomb.npz"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("inputs.npy", bomb.read_bytes())
    with pytest.raises(InputError, match=r"bomb.npz\[inputs\].*declaring shape"):
        load_data(str(archive))
    torch.save(torch.nn.Linear(64, 2), tmp_path / "m.pt")
    line = one_line_exit_2(cv("measure", tmp_path / "m.pt", "--data", bomb))
    assert "declaring shape (2000000, 2000000)" in line
    # An honest header still loads.
    np.save(tmp_path / "ok.npy", np.ones((3, 4)))
    assert load_data(str(tmp_path / "ok.npy")).shape == (3, 4)


def test_binary_file_given_as_csv_is_one_line(tmp_path: Path) -> None:
    torch.save(torch.nn.Linear(64, 2), tmp_path / "m.pt")
    binary = bytes(range(256)) * 4
    (tmp_path / "x.csv").write_bytes(binary)
    line = one_line_exit_2(cv("measure", tmp_path / "m.pt", "--data", tmp_path / "x.csv"))
    assert "x.csv" in line
    (tmp_path / "out.csv").write_bytes(binary)
    for extra in ([], ["--resume"]):
        line = one_line_exit_2(cv("measure", tmp_path / "m.pt", "--data", "digits", "--samples",
                                  "3", "--csv", tmp_path / "out.csv", *extra))
        assert "expected a CSV table (UTF-8 text)" in line
    assert (tmp_path / "out.csv").read_bytes() == binary


def test_remote_code_in_a_hugging_face_directory_never_runs(hf_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = _copy(hf_dir, tmp_path / "remote")
    config = json.loads((path / "config.json").read_text())
    config.update(auto_map={"AutoModel": "evil.EvilModel"}, architectures=["EvilModel"])
    (path / "config.json").write_text(json.dumps(config))
    (path / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    for options in (LoadOptions(), LoadOptions(trust=True)):
        with pytest.raises(InputError, match="remote code is never run"):
            load_checkpoint(path, options)
    assert not marker.exists()
