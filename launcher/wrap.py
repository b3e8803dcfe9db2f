"""Wrap a model for the strategy :func:`launcher.setup` chose."""
from __future__ import annotations

import logging

import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .dist import DistInfo
from .errors import LaunchError

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
        sync_bn: convert BatchNorm layers to ``nn.SyncBatchNorm`` (ddp, several processes, CUDA only). With
            one process it changes nothing (logged): there is nothing to synchronise, and SyncBatchNorm's
            forward raises on CPU inputs whenever a process group exists.
        find_unused_parameters, static_graph: passed to ``DistributedDataParallel``.

    Returns:
        The module to train (the bare model for ``single``).

    Raises:
        LaunchError: ``sync_bn`` with several CPU processes, or ``ddp`` without a live process group.

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
    if info.strategy != "ddp" or info.world_size == 1:
        _log.info("sync_bn ignored: %d process(es) with strategy %s, nothing to synchronise; BatchNorm kept",
                  info.world_size, info.strategy)
        return model
    if info.device.type != "cuda":
        raise LaunchError(
            f"SyncBatchNorm needs CUDA but the {info.world_size} processes run on {info.device.type}: "
            "drop --sync-bn on CPU"
        )
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


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
