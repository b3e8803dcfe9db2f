"""Stragglers: every rank's own step time, compared across the ranks at each metrics row.

Under DDP every rank's wall-clock step takes as long as the slowest rank's (they meet in the gradient
all-reduce), so a slow rank cannot be seen in step times as such. What differs is each rank's *own* time: the
phases it spends without waiting for a peer (data loading, forward, optimizer; ``launcher.watchdog.LOCAL``).
The training loop collects those per step (``Watchdog.take_step_times``) and, at each metrics row, every rank
gathers every rank's list (:func:`gather_step_times`: one all-gather of the window's numbers); then
:class:`Stragglers` gives the row's min / median / max over the ranks and the slowest rank, and a one-line
warning when a rank stays more than :data:`FACTOR` times the median of the OTHER ranks for N consecutive steps
(the others, so that with two ranks a rank 3x slower than its peer counts: the median of both would be 2x).
"""
from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch
import torch.distributed as dist

from .dist import DistInfo

FACTOR = 2.0


def gather_step_times(values: Sequence[float], info: DistInfo) -> list[list[float]]:
    """Every rank's ``values`` (the same length on every rank), indexed by rank: one all-gather. A collective
    when a process group is up; ``[values]`` without one."""
    if not info.distributed or info.world_size == 1:
        return [list(values)]
    row = torch.tensor(list(values), dtype=torch.float64, device=info.device)
    rows = [torch.empty_like(row) for _ in range(info.world_size)]
    dist.all_gather(rows, row)
    return [r.cpu().tolist() for r in rows]


class Stragglers:
    """Consecutive-step straggler detection over per-rank step times; pure (no collective, no I/O).

    Args:
        steps: warn when a rank is more than :data:`FACTOR` x the others' median for this many consecutive
            steps (0: never warn; the metrics are still computed). Once per episode: a rank that recovers and
            falls behind again is warned about again.
    """

    def __init__(self, steps: int, factor: float = FACTOR):
        self.steps, self.factor = steps, factor
        self._run: dict[int, int] = {}
        self._since: dict[int, int] = {}

    def update(self, first_step: int, per_rank: Sequence[Sequence[float]]) -> tuple[dict[str, float], list[str]]:
        """``per_rank[r][i]``: rank r's own time in step ``first_step + i``. Returns the metrics of the window
        (``step_time_min/median/max``: over the ranks' mean own step time; ``slowest_rank``) and the warnings
        (one line each) for the ranks that became stragglers in it."""
        means = [statistics.fmean(t) if t else 0.0 for t in per_rank]
        slowest = max(range(len(means)), key=lambda r: means[r])
        row = {"step_time_min": min(means), "step_time_median": statistics.median(means),
               "step_time_max": means[slowest], "slowest_rank": slowest}
        warnings = []
        n = min((len(t) for t in per_rank), default=0)
        for i in range(n if len(per_rank) > 1 else 0):
            column = [t[i] for t in per_rank]
            for r, own in enumerate(column):
                others = statistics.median(column[:r] + column[r + 1:])
                if own > self.factor * others:
                    if self._run.get(r, 0) == 0:
                        self._since[r] = first_step + i
                    self._run[r] = self._run.get(r, 0) + 1
                    if self.steps and self._run[r] == self.steps:
                        warnings.append(
                            f"rank {r} is a straggler: its own step time (data, forward, optimizer) has been more than "
                            f"{self.factor:g}x the other ranks' median for {self.steps} consecutive steps (steps "
                            f"{self._since[r]}-{first_step + i}; last {own:.3f} s vs {others:.3f} s), and every rank "
                            "waits for it at each step: look at its host (load, throttling, its data source)")
                else:
                    self._run[r] = 0
        return row, warnings
