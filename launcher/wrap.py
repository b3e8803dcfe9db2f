"""Wrap a model for the strategy :func:`launcher.setup` chose."""
from __future__ import annotations

import logging

import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .dist import DistInfo
from .errors import LaunchError
from .syncbn import convert_sync_batchnorm

_log = logging.getLogger("anytopo.launcher")


def wrap_model(model: nn.Module, info: DistInfo, *, sync_bn: bool = False,
               find_unused_parameters: bool = False, static_graph: bool = False) -> nn.Module:
    """Move ``model`` to ``info.device`` and wrap it for ``info.strategy``.

    * ``single``: the model itself, on the device.
    * ``dp``: ``nn.DataParallel`` over the visible GPUs. On CPU it still wraps (DataParallel then calls the
      module directly), so the state-dict keys carry the ``module.`` prefix on every machine alike.
    * ``ddp``: ``DistributedDataParallel`` (``device_ids=[local_rank]`` on CUDA, ``None`` on CPU). Needs the
      process group of :func:`launcher.setup`; wrap inside the ``with distributed(...)`` block.

    Args:
        model: the bare module.
        info: from :func:`launcher.setup`.
        sync_bn: BatchNorm layers normalise over the global batch (ddp, several processes): torch's
            ``nn.SyncBatchNorm`` on CUDA, :class:`launcher.syncbn.SyncBatchNorm` on any other device (gloo).
            With one process it changes nothing (logged): each BatchNorm already sees the whole batch.
        find_unused_parameters, static_graph: passed to ``DistributedDataParallel``.

    Returns:
        The module to train (the bare model for ``single``).

    Raises:
        LaunchError: ``ddp`` without a live process group.

    Example:
        >>> net = wrap_model(build_model(cfg), info, sync_bn=args.sync_bn)
    """
    if sync_bn:
        model = _sync_batchnorm(model, info)
    if info.strategy == "single":
        return model.to(info.device)
    if info.strategy == "dp":
        if info.device.type != "cuda":
            _log.info("dp on %s: DataParallel calls the module directly (keys still get 'module.')", info.device)
        return nn.DataParallel(model.to(info.device))
    if info.strategy == "ddp":
        if not (info.distributed and dist.is_available() and dist.is_initialized()):
            raise LaunchError(
                "strategy 'ddp' needs the process group of launcher.setup('ddp'): wrap the model inside "
                "`with launcher.distributed('ddp') as info:` (not after teardown)"
            )
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model.to(info.device), device_ids=device_ids,
                                       find_unused_parameters=find_unused_parameters, static_graph=static_graph)
    raise LaunchError(f"unknown strategy {info.strategy!r}: use one of single, dp, ddp")


def _sync_batchnorm(model: nn.Module, info: DistInfo) -> nn.Module:
    """BatchNorm over the global batch: torch's ``nn.SyncBatchNorm`` on CUDA (fused kernels), else
    :class:`launcher.syncbn.SyncBatchNorm` (any backend: gloo on CPU). One process: unchanged."""
    if info.strategy != "ddp" or info.world_size == 1:
        _log.info("sync_bn ignored: %d process(es) with strategy %s, each BatchNorm sees the whole batch; kept",
                  info.world_size, info.strategy)
        return model
    if info.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return convert_sync_batchnorm(model)


def sync_buffers(model: nn.Module, info: DistInfo) -> None:
    """Broadcast every buffer (e.g. BatchNorm running statistics) from rank 0 to all ranks, in place.

    DDP broadcasts buffers at the start of each training forward, so after the last training step every
    rank still holds the statistics of its own last batch. Evaluating, or comparing with a checkpoint
    (which rank 0 writes), needs the replicas identical again: call this before evaluation.
    No-op without a process group of more than one rank.
    """
    if not info.distributed or info.world_size == 1:
        return
    for buf in model.buffers():
        dist.broadcast(buf.data, src=0)
