"""How a kernel is split into pieces that fit a memory budget.

The kernel is a sum over parameter groups, ``K = Σ_g J_g J_gᵀ``, and within a group a
sum over pairs of sample blocks. The plan keeps one group's Jacobian for all samples
within half the budget when it can (parameter tensors are packed greedily, in model
order, into groups of at most ``budget / (2·N·O·itemsize)`` parameters); a single
tensor too large for that is measured in sample blocks, two of which (each at most a
quarter of the budget) are resident at a time. Jacobians are computed in chunks of
samples whose Jacobian takes at most a quarter of the budget.

The budget covers Jacobian storage; the kernel itself (``D² · itemsize``) and the
framework's activations come on top. N need not be a multiple of any block size.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Group:
    """Indices of parameter tensors measured together, and their total size."""

    members: tuple[int, ...]
    size: int


@dataclass(frozen=True)
class Plan:
    """A blocking plan for one kernel; see the module docstring."""

    n_samples: int
    n_outputs: int
    itemsize: int
    budget: int
    groups: tuple[Group, ...]

    def _per_sample(self, group: Group) -> int:
        return max(1, self.n_outputs * group.size * self.itemsize)

    def sample_blocks(self, group: Group) -> list[tuple[int, int]]:
        """Sample ranges whose pairwise products make up this group's kernel."""
        n = self.n_samples
        if n * self._per_sample(group) <= self.budget // 2:
            return [(0, n)]
        size = max(1, (self.budget // 4) // self._per_sample(group))
        return [(a, min(a + size, n)) for a in range(0, n, size)]

    def chunks(self, group: Group, start: int, stop: int) -> list[tuple[int, int]]:
        """Sample ranges to compute Jacobians in, within ``[start, stop)``."""
        size = max(1, (self.budget // 4) // self._per_sample(group))
        return [(a, min(a + size, stop)) for a in range(start, stop, size)]


def plan_blocks(*, n_samples: int, n_outputs: int, group_sizes: list[int], itemsize: int,
                budget: int) -> Plan:
    """Pack parameter tensors into groups and return the plan.

    >>> p = plan_blocks(n_samples=10, n_outputs=2, group_sizes=[100, 100, 500], itemsize=4,
    ...                 budget=2 * 10 * 2 * 200 * 4)
    >>> [g.members for g in p.groups]
    [(0, 1), (2,)]
    >>> p.sample_blocks(p.groups[0]), len(p.sample_blocks(p.groups[1]))
    ([(0, 10)], 5)
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
    return Plan(n_samples=n_samples, n_outputs=n_outputs, itemsize=itemsize, budget=budget,
                groups=tuple(groups))
