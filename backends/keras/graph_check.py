"""Checking a SavedModel's graph before TensorFlow loads it.

A SavedModel is a program: its functions may read and write files (``ReadFile``,
``WriteFile``), print, or call Python (``PyFunc``) when the model is called, and
``tf.saved_model.load`` runs some of them (resource initializers) while loading. Without
``--trust`` cvcore parses ``saved_model.pb`` with the protobuf classes (nothing is loaded
or run) and allows only side-effect-free math, neural-network, shape and control-flow ops
(:data:`PURE_OPS`), in the graph and in every function of its library, following each
function reference (``f``, ``then_branch``, ``body``, ...) to the function it names.

The one exception is the checkpoint code every SavedModel carries: the functions the
``saver_def`` nodes call (and only those) may also use :data:`CHECKPOINT_OPS`, which read
and write the SavedModel's own ``variables/`` files. A function reachable from anything
else is held to :data:`PURE_OPS` even if the saver also calls it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from cvcore.errors import InputError, UntrustedFileError


def _words(text: str) -> list[str]:
    """The whitespace-separated names in ``text``."""
    return text.split()


#: Ops that compute on tensors and variables and touch nothing outside the process.
PURE_OPS = frozenset(_words("""
Const Identity IdentityN NoOp Placeholder PlaceholderWithDefault StopGradient PreventGradient
Snapshot EnsureShape CheckNumerics CheckNumericsV2 Assert
VarHandleOp ReadVariableOp AssignVariableOp AssignAddVariableOp AssignSubVariableOp
VarIsInitializedOp DestroyResourceOp DisableCopyOnRead ResourceGather ResourceGatherNd
VariableV2 Variable Assign AssignAdd AssignSub IsVariableInitialized
StatefulPartitionedCall PartitionedCall If StatelessIf While StatelessWhile Case StatelessCase
Enter Exit Merge Switch NextIteration LoopCond ControlTrigger
Add AddV2 AddN Sub Mul MulNoNan Div DivNoNan RealDiv FloorDiv FloorMod TruncateDiv
TruncateMod Mod Maximum Minimum Neg Abs Sign Square Sqrt Rsqrt Exp Expm1 Log Log1p Pow
Reciprocal Inv Sin Cos Tan Tanh Sinh Cosh Asin Acos Atan Atan2 Asinh Acosh Atanh Erf Erfc
Erfinv Ndtri Lgamma Digamma Sigmoid Softplus Softsign Relu Relu6 Elu Selu LeakyRelu Gelu
Round Floor Ceil Rint SquaredDifference Xlogy Xdivy Xlog1py BiasAdd BiasAddV1 MatMul
BatchMatMul BatchMatMulV2 BatchMatMulV3 Einsum Conv Conv2D Conv3D DepthwiseConv2dNative
Conv2DBackpropInput Conv3DBackpropInputV2 DepthwiseConv2dNativeBackpropInput MaxPool
MaxPoolV2 MaxPool3D AvgPool AvgPool3D Softmax LogSoftmax FusedBatchNorm FusedBatchNormV2
FusedBatchNormV3 LRN L2Loss Sum Mean Prod Max Min ArgMax ArgMin All Any Cumsum Cumprod
Cumulativelogsumexp EuclideanNorm Reshape Shape ShapeN Size Rank ExpandDims Squeeze Transpose
ConjugateTranspose Concat ConcatV2 ConcatOffset Pack Unpack Split SplitV Slice StridedSlice
TensorStridedSliceUpdate Tile Pad PadV2 MirrorPad Gather GatherV2 GatherNd ScatterNd
TensorScatterUpdate TensorScatterAdd Fill ZerosLike OnesLike Range LinSpace Cast Bitcast
Select SelectV2 Where Equal NotEqual Less LessEqual Greater GreaterEqual LogicalAnd LogicalOr
LogicalNot IsNan IsInf IsFinite ClipByValue BroadcastTo BroadcastArgs BroadcastGradientArgs
OneHot TopKV2 Reverse ReverseV2 ResizeBilinear ResizeNearestNeighbor ResizeBicubic
MatrixBandPart MatrixDiag MatrixDiagV2 MatrixDiagV3 MatrixDiagPart MatrixDiagPartV2
MatrixDiagPartV3 MatrixSetDiag MatrixSetDiagV2 MatrixSetDiagV3 Diag DiagPart Qr Cholesky
MatrixInverse MatrixDeterminant SelfAdjointEigV2 Svd Unique UniqueV2 InvertPermutation
SpaceToDepth DepthToSpace SpaceToBatchND BatchToSpaceND ExtractImagePatches Conv2DBackpropFilter
SparseSoftmaxCrossEntropyWithLogits SoftmaxCrossEntropyWithLogits Complex Real Imag
Angle Conj ComplexAbs FFT IFFT RFFT IRFFT Bucketize BitwiseAnd BitwiseOr BitwiseXor Invert
LeftShift RightShift TensorListReserve TensorListSetItem TensorListGetItem
TensorListFromTensor TensorListStack TensorListLength TensorListElementShape
TensorListPushBack TensorListPopBack TensorListConcatV2 TensorListSplit TensorListResize
EmptyTensorList TensorArrayV3 TensorArrayWriteV3 TensorArrayReadV3 TensorArrayGatherV3
TensorArrayScatterV3 TensorArraySizeV3 TensorArrayConcatV3 TensorArraySplitV3
RandomUniform RandomUniformInt RandomStandardNormal TruncatedNormal StatelessRandomUniformV2
StatelessRandomNormalV2 StatelessRandomUniformIntV2 StatelessTruncatedNormalV2
StatelessRandomGetKeyCounter StatelessRandomGetAlg StatelessRandomGetKeyCounterAlg
StatelessRandomUniform StatelessRandomNormal RngReadAndSkip StringFormat AsString
"""))
#: Ops that read and write checkpoint files; allowed only in the saver's own functions.
CHECKPOINT_OPS = frozenset(_words("""
SaveV2 RestoreV2 Save SaveSlices Restore RestoreSlice MergeV2Checkpoints ShardedFilename
ShardedFilespec StringJoin StaticRegexFullMatch
"""))


def _func_names(attrs: Any) -> Iterator[str]:
    """The names of the functions a node's attributes refer to."""
    for value in attrs.values():
        if value.HasField("func"):
            yield value.func.name
        if value.HasField("list"):
            yield from (f.name for f in value.list.func)


def _refused(path: Path, op: str, where: str) -> UntrustedFileError:
    return UntrustedFileError(
        f"{path}: expected a SavedModel whose graph uses only side-effect-free ops, got the "
        f"op {op} in {where}; nothing was run. If you made this file yourself, pass --trust "
        "to load it"
    )


def _node_name(tensor: str) -> str:
    return tensor.lstrip("^").split(":")[0]


class _Checker:
    """Checks one meta graph's nodes and functions against the two op sets."""

    def __init__(self, path: Path, meta_graph: Any) -> None:
        self.path = path
        self.library = {f.signature.name: f for f in meta_graph.graph_def.library.function}
        self.graph = meta_graph.graph_def
        self.saver = meta_graph.saver_def
        self.checked: dict[str, bool] = {}  # function -> checked as pure

    def run(self, concrete: Iterable[str]) -> None:
        nodes = {n.name: n for n in self.graph.node}
        saver_roots = {_node_name(n) for n in (self.saver.save_tensor_name,
                                               self.saver.restore_op_name) if n}
        saver_side = self._closure(nodes, saver_roots)
        pure_side = self._closure(nodes, set(nodes) - saver_side)
        for name in sorted(pure_side):
            self._node(nodes[name], True, "the graph")
        for name in sorted(saver_side - pure_side):
            self._node(nodes[name], False, "the graph's saver")
        for fn in concrete:
            self._function(fn, True)
        for fn in sorted(self.library):  # also what nothing seems to call
            if fn not in self.checked:
                self._function(fn, True)

    @staticmethod
    def _closure(nodes: dict[str, Any], roots: set[str]) -> set[str]:
        seen: set[str] = set()
        stack = [r for r in roots if r in nodes]
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            stack.extend(n for n in map(_node_name, nodes[name].input) if n in nodes)
        return seen

    def _node(self, node: Any, pure: bool, where: str) -> None:
        self._op(node.op, pure, f"{where} (node {node.name})")
        for fn in _func_names(node.attr):
            if fn in self.library:
                self._function(fn, pure)
            else:  # TensorFlow runs an op of that name in place of a missing function
                self._op(fn, pure, f"{where} (node {node.name}, as a function)")

    def _op(self, op: str, pure: bool, where: str) -> None:
        if op in self.library:  # a node may call a library function by its op name
            self._function(op, pure)
        elif op not in PURE_OPS and (pure or op not in CHECKPOINT_OPS):
            raise _refused(self.path, op, where)

    def _function(self, name: str, pure: bool) -> None:
        if name not in self.library:
            raise _refused(self.path, name, "a function reference")
        if self.checked.get(name) is True or (name in self.checked and not pure):
            return
        self.checked[name] = pure
        for node in self.library[name].node_def:
            self._node(node, pure, f"function {name}")


def check_saved_model(path: Path) -> None:
    """Refuse a SavedModel whose graph or functions use an op outside the allowlists.

    Raises:
        UntrustedFileError: names the first op outside them and where it is.
        InputError: ``saved_model.pb`` cannot be parsed.
    """
    from google.protobuf.message import DecodeError
    from tensorflow.core.protobuf import saved_model_pb2

    model = saved_model_pb2.SavedModel()
    try:
        model.ParseFromString((path / "saved_model.pb").read_bytes())
    except (DecodeError, OSError, RuntimeWarning) as exc:
        raise InputError(f"{path}: expected a readable saved_model.pb, got {exc}") from None
    if not model.meta_graphs:
        raise InputError(f"{path}: expected a SavedModel with a meta graph, got none")
    for meta_graph in model.meta_graphs:
        concrete = list(meta_graph.object_graph_def.concrete_functions)
        _Checker(path, meta_graph).run(concrete)
