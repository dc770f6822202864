"""Checking a ``torch.export`` archive (``.pt2``) before torch reads it.

``torch.export.load`` is documented as unsafe for untrusted files. Reading torch 2.13's
``torch/export/pt2_archive/_package.py`` and ``torch/_export/serde/serialize.py``, these
are the places where loading (or later running) an archive executes something other than
tensor arithmetic, and what :func:`check_export_archive` does about each:

* a weight or tensor constant whose payload config says ``use_pickle``: unpickled with
  ``weights_only=False`` -> refused;
* a constant stored as ``custom_obj_*`` (TorchScript pickler, torchbind classes) or
  ``opaque_obj_*`` (plain ``pickle.loads``) -> refused;
* the legacy weight / constant files ``data/{weights,constants}/<model>.pt`` and
  ``data/sample_inputs/<model>.pt``: loaded with ``weights_only=True`` and, when that
  fails, again with ``weights_only=False`` -> legacy files are refused, the sample inputs
  are tried here with ``weights_only=True`` and refused if that fails;
* ``data/aotinductor/`` (a compiled shared library, loaded and run) -> refused;
* torch.export.load's fallback to the 2.7 format (``serialized_*.pt``, again with a
  ``weights_only=False`` fallback) when the new reader fails -> never reached: cvcore calls
  the new-format reader itself;
* the graph: every node's target (and every operator passed as an argument) is resolved
  by attribute lookup under ``torch``, ``_operator`` or ``math`` and *called* when the
  program runs (``torch.os.system`` resolves); only ``torch.ops.aten`` / ``prims``
  operators (minus the ones that read files or print), a few structured control-flow
  higher-order operators and the symbolic-arithmetic functions are allowed;
* symbolic shape expressions are parsed with ``sympy.sympify``, which evaluates Python:
  each must be made of numbers, shape symbols and known sympy functions;
* tree specs naming a ``defaultdict`` factory or an enum import a module by name ->
  refused.

Everything is read with the same zip reader torch uses (``PyTorchFileReader``), from the
bytes that are then handed to torch, so what is checked is what is loaded.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from typing import Any

from cvcore.errors import InputError, UntrustedFileError
from cvcore.imports import require

#: Operators of these ``torch.ops`` namespaces are built-in tensor operators.
OP_NAMESPACES = ("torch.ops.aten.", "torch.ops.prims.")
#: Built-in operators that touch files or the terminal.
DENIED_OPS = ("from_file", "_print", "print")
#: Higher-order operators that only structure the graph (their subgraphs are checked too).
HIGHER_ORDER = frozenset({
    "cond", "while_loop", "while_loop_stack_output", "map_impl", "scan", "associative_scan",
    "wrap_with_set_grad_enabled", "wrap_with_autocast", "invoke_subgraph", "auto_functionalized",
    "auto_functionalized_v2", "with_effects", "out_dtype", "flex_attention", "_export_tracepoint",
})
#: Symbolic-shape arithmetic torch serializes by Python name.
SYMBOLIC = frozenset({
    "_operator.getitem", "_operator.eq", "_operator.ne", "_operator.le", "_operator.ge",
    "_operator.lt", "_operator.gt", "_operator.neg", "_operator.pos", "_operator.mul",
    "_operator.add", "_operator.sub", "_operator.floordiv", "_operator.mod", "_operator.pow",
    "_operator.truediv", "_operator.and_", "_operator.or_", "_operator.lshift",
    "_operator.rshift", "math.trunc", "math.ceil", "math.floor", "math.sqrt", "torch.sym_not",
    "torch.sym_int", "torch.sym_float", "torch.sym_ite", "torch.sym_max", "torch.sym_min",
    "torch.sym_sqrt", "torch.sym_sum", "torch._check", "torch._check_is_size",
})
#: Names a symbolic shape expression may call (torch's sympy functions and sympy's own).
SYMPY_NAMES = frozenset({
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt",
    "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv",
    "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt",
    "RoundToInt", "RoundDecimal", "ToFloat", "Identity", "OpaqueUnaryFn_sqrt", "Max", "Min",
    "Abs", "floor", "ceiling", "sqrt", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not",
    "Piecewise", "ITE", "True", "False", "oo", "zoo", "nan", "Integer", "Rational", "Float",
    "int_oo",
})
_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)|([A-Za-z_][A-Za-z0-9_]*)"
                    r"|(\*\*|//|<=|>=|==|!=|[-+*/%()<>,&|~]))")
_SYMBOL = re.compile(r"[a-z]+\d+")
#: Members of a current archive, relative to its root folder.
_FIXED = frozenset({"archive_format", "archive_version", "byteorder", ".data/version",
                    ".data/serialization_id"})


def _untrusted(source: str, what: str) -> UntrustedFileError:
    return UntrustedFileError(
        f"{source}: expected a torch.export archive of tensors and built-in operators, got "
        f"{what}; nothing was run. If you made this file yourself, pass --trust to load it"
    )


def _malformed(source: str, what: str) -> InputError:
    return InputError(f"{source}: expected a torch.export .pt2 archive, got {what}")


def _json(reader: Any, name: str, source: str) -> Any:
    try:
        return json.loads(reader.read_string(name))
    except (RuntimeError, UnicodeDecodeError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _malformed(source, f"an unreadable {name} ({first})") from None


def _walk(obj: Any) -> Iterator[dict[str, Any]]:
    """Every dict nested in a JSON value (subgraphs included)."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _strings(obj: Any) -> Iterator[str]:
    for item in _walk({"": obj}):
        for value in item.values():
            if isinstance(value, str):
                yield value
            elif isinstance(value, list):
                yield from (v for v in value if isinstance(v, str))


def target_allowed(name: str) -> bool:
    """Whether a serialized call target is a side-effect-free operator cvcore may run."""
    if name in SYMBOLIC:
        return True
    if name.startswith("torch.ops.higher_order."):
        return name.split(".")[3] in HIGHER_ORDER
    for prefix in OP_NAMESPACES:
        if name.startswith(prefix):
            op = name[len(prefix):].split(".")[0]
            return bool(op) and op not in DENIED_OPS and "file" not in op
    return False


def expression_allowed(expr: str) -> bool:
    """Whether a symbolic shape expression holds only numbers, shape symbols, operators
    and known sympy functions (sympify evaluates anything else as Python)."""
    pos = 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if match is None or match.end() == pos:
            return expr[pos:].strip() == ""
        name = match.group(2)
        if name is not None and name not in SYMPY_NAMES and not _SYMBOL.fullmatch(name):
            return False
        pos = match.end()
    return True


def _check_graph(model: Any, member: str, source: str) -> None:
    for item in _walk(model):
        target = item.get("target") if {"inputs", "outputs"} <= item.keys() else None
        for name in (target, item.get("as_operator")):
            if isinstance(name, str) and not target_allowed(name):
                raise _untrusted(source, f"a call to {name} in {member}, which would run "
                                         "when the program runs")
        expr = item.get("expr_str")
        if isinstance(expr, str) and not expression_allowed(expr):
            raise _untrusted(source, f"the shape expression {expr[:60]!r} in {member}, which "
                                     "torch would evaluate as Python")
    for text in _strings(model):
        if "default_factory_module" in text or '"__enum__"' in text:
            raise _untrusted(source, f"a tree spec in {member} that names a module to "
                                     "import")


def _check_payloads(reader: Any, config_name: str, folder: str, source: str,
                    prefixes: tuple[str, ...]) -> None:
    config = _json(reader, config_name, source)
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise _malformed(source, f"{config_name} without a 'config' mapping")
    for fqn, meta in entries.items():
        if not isinstance(meta, dict):
            raise _malformed(source, f"an entry {fqn!r} in {config_name} that is not a mapping")
        path = str(meta.get("path_name", ""))
        if not path.startswith(prefixes):
            raise _untrusted(source, f"{folder}{path} ({fqn}), an object that torch would "
                                     "unpickle without restriction")
        if meta.get("use_pickle"):
            raise _untrusted(source, f"{folder}{path} ({fqn}), which torch would unpickle with "
                                     "weights_only=False")


def _weights_only_loadable(data: bytes) -> bool:
    torch = require("torch")
    if not data:
        return True
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - torch would then retry without weights_only
        return False
    return True


def check_export_archive(data: bytes, source: str) -> list[str]:
    """Refuse a ``.pt2`` archive whose loading or running would execute anything other than
    built-in tensor operators; return the names of its programs.

    Raises:
        UntrustedFileError: the archive needs pickle, compiled code or arbitrary callables.
        InputError: the archive is malformed.
    """
    require("torch")
    from torch.export.pt2_archive import constants as c
    from torch.export.pt2_archive._package import PT2ArchiveReader

    try:
        reader = PT2ArchiveReader(io.BytesIO(data))
        names = reader.get_file_names()
    except (RuntimeError, AssertionError, UnicodeDecodeError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _malformed(source, first) from None
    if len(set(names)) != len(names):
        raise _malformed(source, "a zip with duplicate member names")
    models = [n[len(c.MODELS_DIR):-len(".json")] for n in names
              if n.startswith(c.MODELS_DIR) and n.endswith(".json")]
    expected = set(_FIXED)
    for model in models:
        expected |= {c.MODELS_FILENAME_FORMAT.format(model),
                     c.WEIGHTS_CONFIG_FILENAME_FORMAT.format(model),
                     c.CONSTANTS_CONFIG_FILENAME_FORMAT.format(model),
                     c.SAMPLE_INPUTS_FILENAME_FORMAT.format(model)}
    for name in names:
        if name in expected or name.startswith(c.EXTRA_DIR):
            continue
        if name.startswith(c.AOTINDUCTOR_DIR):
            raise _untrusted(source, f"{name}, compiled code that torch would load and run")
        in_weights = name.startswith(c.WEIGHTS_DIR + c.WEIGHT_FILENAME_PREFIX)
        in_constants = name.startswith(c.CONSTANTS_DIR + c.TENSOR_CONSTANT_FILENAME_PREFIX)
        if not (in_weights or in_constants):
            raise _untrusted(source, f"the member {name}, which this reader does not know "
                                     "to be tensor data")
    if not models:
        raise _malformed(source, "no program under models/")
    for model in models:
        member = c.MODELS_FILENAME_FORMAT.format(model)
        _check_graph(_json(reader, member, source), member, source)
        _check_payloads(reader, c.WEIGHTS_CONFIG_FILENAME_FORMAT.format(model), c.WEIGHTS_DIR,
                        source, (c.WEIGHT_FILENAME_PREFIX,))
        _check_payloads(reader, c.CONSTANTS_CONFIG_FILENAME_FORMAT.format(model),
                        c.CONSTANTS_DIR, source, (c.TENSOR_CONSTANT_FILENAME_PREFIX,))
        inputs = c.SAMPLE_INPUTS_FILENAME_FORMAT.format(model)
        if inputs in names and not _weights_only_loadable(reader.read_bytes(inputs)):
            raise _untrusted(source, f"{inputs}, which torch would unpickle with "
                                     "weights_only=False (it is not loadable with weights_only=True)")
    return models


def load_checked(data: bytes, source: str) -> Any:
    """The ``model`` program of an archive that passed :func:`check_export_archive`, read
    by torch's current-format reader only (never its legacy fallback, which unpickles)."""
    from torch.export.pt2_archive._package import load_pt2

    contents = load_pt2(io.BytesIO(data))
    program = contents.exported_programs.get("model")
    if program is None:
        raise _malformed(source, f"programs {sorted(contents.exported_programs)} and none "
                                 "named 'model'")
    return program
