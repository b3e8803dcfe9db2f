"""Which samples each rank reads: :class:`TrainSampler`, :class:`EvalSampler`, :func:`per_rank_batch`.

How data is split is a topology question, so it lives here, next to :class:`~launcher.dist.DistInfo`.
Both samplers take either a ``DistInfo`` or a ``(rank, world_size)`` pair.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Union

import torch
from torch.utils.data import Sampler

from .dist import DistInfo
from .errors import LaunchError

Topology = Union[DistInfo, tuple[int, int]]


def _rank_world(topology: Topology) -> tuple[int, int]:
    if isinstance(topology, DistInfo):
        rank, world = topology.rank, topology.world_size
    else:
        rank, world = topology
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world}")
    return int(rank), int(world)


def per_rank_batch(global_batch: int, topology: Topology) -> int:
    """The DataLoader ``batch_size`` for each rank: ``global_batch // world_size``.

    Raises:
        LaunchError: ``global_batch`` is not a multiple of the world size (the global batch, and with it
            the learning-rate schedule and the resume position, would depend on the number of processes).
    """
    _, world = _rank_world(topology)
    if global_batch < 1 or global_batch % world:
        raise LaunchError(
            f"global batch {global_batch} is not a positive multiple of the {world} processes: "
            f"pick a batch size divisible by {world}, or launch a number of processes that divides it"
        )
    return global_batch // world


class TrainSampler(Sampler[int]):
    """Training indices for one rank: the same global order for every world size.

    Each epoch draws one permutation of ``range(dataset_len)`` from a ``torch.Generator`` seeded with
    ``seed + epoch`` (identity order when ``shuffle=False``), drops its tail to ``(N // W) * W`` samples
    (like ``DistributedSampler(drop_last=True)``) and gives rank ``r`` the positions ``r, r+W, r+2W, ...``.

    **Global-batch invariance.** With a global batch ``B`` divisible by ``W`` and
    ``DataLoader(dataset, batch_size=B // W, sampler=..., drop_last=True)``, global batch ``b`` of an epoch
    (the union over ranks of each rank's ``b``-th batch) is exactly the permutation positions
    ``[b*B, (b+1)*B)`` — whatever ``W`` is. Hence an epoch has ``N // B`` steps for every world size, and a
    run stopped after step ``k`` of an epoch resumes exactly, on any number of processes, with
    ``set_epoch(epoch); set_start(k, B // W)``.

    Args:
        dataset_len: number of samples ``N`` (at least the world size).
        topology: a :class:`DistInfo`, or ``(rank, world_size)``.
        seed: base seed; the same on every rank (it defines the shared permutation).
        shuffle: permute each epoch; ``False`` keeps index order.

    Example:
        >>> sampler = TrainSampler(len(ds), info, seed=cfg.seed)
        >>> loader = DataLoader(ds, batch_size=per_rank_batch(B, info), sampler=sampler, drop_last=True)
        >>> for epoch in range(start_epoch, epochs):
        ...     sampler.set_epoch(epoch)
        ...     if epoch == start_epoch:
        ...         sampler.set_start(step_in_epoch, per_rank_batch(B, info))
    """

    def __init__(self, dataset_len: int, topology: Topology, *, seed: int, shuffle: bool = True) -> None:
        self.rank, self.world_size = _rank_world(topology)
        if dataset_len < self.world_size:
            raise ValueError(f"dataset of {dataset_len} samples cannot feed {self.world_size} ranks")
        self.dataset_len = dataset_len
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self._skip = 0

    @property
    def per_rank(self) -> int:
        """Samples each rank gets per epoch before any skip: ``N // W``."""
        return self.dataset_len // self.world_size

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation. Moving to another epoch clears :meth:`set_start`'s skip."""
        if epoch != self.epoch:
            self._skip = 0
        self.epoch = epoch

    def set_start(self, batch_index: int, per_rank_batch: int) -> None:
        """Start the current epoch at its ``batch_index``-th batch (0 = from the start).

        Skips the first ``batch_index * per_rank_batch`` samples of this rank's share, which is where a
        run that completed ``batch_index`` global batches of this epoch stopped (see the class doc). Call
        after :meth:`set_epoch`; the skip lasts until the epoch changes.
        """
        if batch_index < 0 or per_rank_batch < 1:
            raise ValueError(f"need batch_index >= 0 and per_rank_batch >= 1, got {batch_index}, {per_rank_batch}")
        skip = batch_index * per_rank_batch
        if skip > self.per_rank:
            raise ValueError(
                f"batch {batch_index} of {per_rank_batch} samples is past this rank's {self.per_rank} samples"
            )
        self._skip = skip

    def __iter__(self) -> Iterator[int]:
        n, w = self.dataset_len, self.world_size
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        mine = order[self.rank:(n // w) * w:w]
        return iter(mine[self._skip:])

    def __len__(self) -> int:
        return self.per_rank - self._skip


class EvalSampler(Sampler[int]):
    """Evaluation indices for one rank: ``range(rank, N, W)``.

    Every sample is seen exactly once across ranks, with no padding and no duplicates, so metrics summed
    with :func:`launcher.all_reduce_sum` are exact. Shards differ in length by at most one sample; that is
    fine for evaluation (no collective runs per batch), but do not use it where DDP runs a backward pass.

    Args:
        dataset_len: number of samples ``N``.
        topology: a :class:`DistInfo`, or ``(rank, world_size)``.
    """

    def __init__(self, dataset_len: int, topology: Topology) -> None:
        self.rank, self.world_size = _rank_world(topology)
        self.dataset_len = dataset_len

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.dataset_len, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.dataset_len, self.world_size))
