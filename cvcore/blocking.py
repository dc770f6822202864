"""How a kernel is split into pieces that fit a memory budget.

The kernel is a sum over parameter groups, ``K = Σ_g J_g J_gᵀ``, and within a group a
sum over pairs of row blocks (a range of samples × a range of outputs). The plan keeps one group's Jacobian for all samples
within half the budget when it can (parameter tensors are packed greedily, in model
order, into groups of at most ``budget / (2·N·O·itemsize)`` parameters); a single
tensor too large for that is measured in sample blocks, two of which (each at most a
quarter of the budget) are resident at a time, and, when one sample's Jacobian for all
outputs is already over a quarter of the budget, in output blocks as well. Jacobians are computed in chunks of
samples whose Jacobian takes at most a quarter of the budget.

The budget covers Jacobian storage; the kernel itself (``D² · itemsize``) and the
framework's activations come on top. N need not be a multiple of any block size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Group:
    """Indices of parameter tensors measured together, and their total size."""

    members: tuple[int, ...]
    size: int


@dataclass(frozen=True)
class BlockPlan:
    """A blocking plan for one kernel; see the module docstring."""

    n_samples: int
    n_outputs: int
    itemsize: int
    budget: int
    groups: tuple[Group, ...]

    def _whole(self, group: Group) -> bool:
        return self.n_samples * self.n_outputs * group.size * self.itemsize <= self.budget // 2

    def _output_block(self, group: Group) -> int:
        if self._whole(group):
            return self.n_outputs
        per_output = max(1, group.size * self.itemsize)  # one sample, one output
        return max(1, min(self.n_outputs, (self.budget // 4) // per_output))

    def _per_sample(self, group: Group) -> int:
        return max(1, self._output_block(group) * group.size * self.itemsize)

    def output_blocks(self, group: Group) -> list[tuple[int, int]]:
        """Output ranges: one sample's Jacobian block stays within a quarter of the budget
        (models with many outputs, such as a language model's vocabulary)."""
        size = self._output_block(group)
        return [(a, min(a + size, self.n_outputs)) for a in range(0, self.n_outputs, size)]

    def sample_blocks(self, group: Group) -> list[tuple[int, int]]:
        """Sample ranges whose pairwise products make up this group's kernel."""
        n = self.n_samples
        if self._whole(group):
            return [(0, n)]
        size = max(1, (self.budget // 4) // self._per_sample(group))
        return [(a, min(a + size, n)) for a in range(0, n, size)]

    def chunks(self, group: Group, start: int, stop: int) -> list[tuple[int, int]]:
        """Sample ranges to compute Jacobians in, within ``[start, stop)``."""
        size = max(1, (self.budget // 4) // self._per_sample(group))
        return [(a, min(a + size, stop)) for a in range(start, stop, size)]


def plan_blocks(*, n_samples: int, n_outputs: int, group_sizes: list[int], itemsize: int,
                budget: int) -> BlockPlan:
    """Pack parameter tensors into groups and return the plan.

    >>> p = plan_blocks(n_samples=10, n_outputs=2, group_sizes=[100, 100, 500], itemsize=4,
    ...                 budget=2 * 10 * 2 * 200 * 4)
    >>> [g.members for g in p.groups]
    [(0, 1), (2,)]
    >>> p.sample_blocks(p.groups[0]), len(p.sample_blocks(p.groups[1]))
    ([(0, 10)], 5)
    >>> p.output_blocks(p.groups[1])
    [(0, 2)]
    >>> tiny = plan_blocks(n_samples=3, n_outputs=5, group_sizes=[100], itemsize=8, budget=3200)
    >>> tiny.output_blocks(tiny.groups[0]), tiny.sample_blocks(tiny.groups[0])
    ([(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)], [(0, 1), (1, 2), (2, 3)])
    """
    limit = max(1, budget // (2 * max(1, n_samples * n_outputs * itemsize)))
    groups: list[Group] = []
    current: list[int] = []
    total = 0
    for index, size in enumerate(group_sizes):
        if current and total + size > limit:
            groups.append(Group(tuple(current), total))
            current, total = [], 0
        current.append(index)
        total += size
    if current:
        groups.append(Group(tuple(current), total))
    return BlockPlan(n_samples=n_samples, n_outputs=n_outputs, itemsize=itemsize,
                     budget=budget, groups=tuple(groups))


#: The name :class:`BlockPlan` had before ``cvcore.plan.MeasurePlan`` existed; third-party
#: backends written against it keep working.
Plan = BlockPlan


def dense_costs(n1: int, n2: int, n_out: int, s: int, d_in: int, d_out: int, traced: bool,
                ) -> dict[str, float]:
    """Multiply-add counts of the two exact rules of a dense layer, for one pair of sample
    blocks of ``n1`` and ``n2`` samples: ``jac`` forms each sample's gradient
    ``Σ_s g_s ⊗ a_s`` and takes a Gram matrix; ``pairs`` contracts Gram matrices of the
    inputs ``a`` (``s`` positions × ``d_in``) and output-gradients ``g`` (``s`` × ``d_out``
    per output) without forming a gradient. Shared by the PyTorch and JAX structured paths.

    >>> c = dense_costs(4, 4, 10, 1, 784, 256, traced=False)
    >>> c["pairs"] < c["jac"]
    True
    """
    o2 = 1 if traced else n_out * n_out
    jac = (n1 + n2) * n_out * s * d_in * d_out + n1 * n2 * n_out * d_in * d_out * (1 if traced else n_out)
    pairs = (n1 * s) * (n2 * s) * (d_in + (n_out if traced else o2) * d_out + o2)
    return {"jac": float(jac), "pairs": float(pairs)}


class OperatorBudget:
    """Memory limits of a matrix-free ``K @ V`` product, shared by the backends' operators.

    A subclass provides ``n``, ``n_outputs``, ``traced``, ``budget``, ``param_bytes`` (one
    vector in parameter space) and ``act_bytes`` (one sample's activations for one vector).
    """

    n: int
    n_outputs: int
    traced: bool
    budget: int
    param_bytes: int
    act_bytes: int

    @property
    def dim(self) -> int:
        """``D``: ``N`` (traced) or ``N·O`` (full)."""
        return self.n if self.traced else self.n * self.n_outputs

    def group_size(self, total: int) -> int:
        """Vectors per group: their ``u`` and one sample's activations within the budget."""
        quarter = max(1, self.budget // 4)
        cap = min(quarter // max(1, self.param_bytes), quarter // max(1, self.act_bytes))
        return max(1, min(total, cap))

    def chunk_size(self, group: int) -> int:
        """Samples per chunk: ``group`` vectors' activations within half the budget."""
        return max(1, min(self.n, (self.budget // 2) // (max(1, group) * max(1, self.act_bytes))))

    def chunks(self, group: int) -> list[tuple[int, int]]:
        """Sample ranges of :meth:`chunk_size` samples."""
        size = self.chunk_size(group)
        return [(a, min(a + size, self.n)) for a in range(0, self.n, size)]

    def matvec(self, vectors: Any) -> Any:
        """``K @ V`` for float64 ``V`` of shape ``(D, k)`` or ``(D,)``, in float64."""
        import numpy as np

        from cvcore.errors import InputError

        arr = np.asarray(vectors, dtype=np.float64)
        single = arr.ndim == 1
        block = arr.reshape(-1, 1) if single else arr
        if block.ndim != 2 or block.shape[0] != self.dim:
            raise InputError(f"expected vectors of shape ({self.dim}, k), got {arr.shape}")
        out = self._matvec(block)
        return out.reshape(-1) if single else out

    def _matvec(self, block: Any) -> Any:
        """``K @ block`` for a float64 ``(D, k)`` block; each backend's product."""
        raise NotImplementedError
