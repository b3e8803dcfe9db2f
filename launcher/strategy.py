"""How the processes share a model: the strategy as an object.

``strategy_for(info, ...)`` returns the ``Strategy`` of ``info.strategy`` (``single``, ``dp``, ``ddp``,
``fsdp``). It owns everything that differs between them, so no caller switches on the name:

- ``wrap(model)``: move to the device, convert BatchNorm (``sync_bn``), compile where it belongs (``compile``:
  the bare model before wrapping; under fsdp each unit's forward after sharding), wrap;
- ``unwrap(model)``: the bare module (by structure: DataParallel, DDP, torch.compile; FSDP2 keeps the module);
- ``no_sync(model)``: skip the gradient all-reduce of a micro-batch that is not the last (ddp);
- ``settle(model, loss)``: before the first step, what makes a resumed run repeat the uninterrupted one (ddp:
  its gradient buckets' final layout);
- ``unsharded(model)``: keep an FSDP2 model's parameters gathered inside the block (evaluation);
- ``sync_buffers(model)``: rank 0's buffers (BatchNorm statistics) on every rank;
- ``topology()``: what a checkpoint records of it (strategy, world size, device type, launcher).

``wrap_model(model, info, ...)`` is ``strategy_for(info, ...).wrap(model)``.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, ClassVar, ContextManager, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .dist import DistInfo
from .errors import LaunchError
from .syncbn import convert_sync_batchnorm

_log = logging.getLogger("anytopo.launcher")


class Strategy:
    """The single-process strategy: the model itself, on the device. Subclasses change what differs."""

    name: ClassVar[str] = "single"
    shards_parameters: ClassVar[bool] = False
    """Each rank holds a shard of every parameter (fsdp): an EMA copy or any full replica must be built apart."""

    def __init__(self, info: DistInfo, *, sync_bn: bool = False, compile: bool = False,
                 param_dtype: torch.dtype | None = None, find_unused_parameters: bool = False,
                 static_graph: bool = False):
        if info.strategy != self.name:
            raise LaunchError(f"internal: strategy {self.name!r} built for a process set up as {info.strategy!r}")
        self.info = info
        self.sync_bn = sync_bn
        self.compile = compile
        self.param_dtype = param_dtype
        self.find_unused_parameters = find_unused_parameters
        self.static_graph = static_graph

    # -- building

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` (bare) moved to the device and made ready to train under this strategy."""
        if self.sync_bn:
            model = _sync_batchnorm(model, self.info)
        model = model.to(self.info.device)
        if self.compile:
            model.compile()  # in place: same class and keys, so checkpoints stay canonical
        return self._wrap(model)

    def _wrap(self, model: nn.Module) -> nn.Module:
        return model

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The bare module inside ``model``: DataParallel, DDP and torch.compile peeled by structure."""
        while True:
            if isinstance(model, (nn.DataParallel, DistributedDataParallel)):
                model = model.module
            elif hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
                model = model._orig_mod
            else:
                return model

    # -- training and evaluation

    def no_sync(self, model: nn.Module) -> ContextManager[Any]:
        """Inside: backward passes accumulate gradients without synchronising them (all but the last
        micro-batch of a step). Only ddp synchronises in backward; elsewhere it changes nothing."""
        return nullcontext()

    def unsharded(self, model: nn.Module) -> ContextManager[Any]:
        """Inside: forwards need no communication (fsdp gathers every unit once, up front)."""
        return nullcontext(model)

    def settle(self, model: nn.Module, loss: Callable[[], torch.Tensor]) -> None:
        """Whatever the wrapper must settle before the first step so that every run, fresh or resumed, takes
        the same steps the same way (see :meth:`DDPStrategy.settle`); ``loss`` computes a loss of one batch.
        Nothing to do here."""

    def sync_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers on every rank (see :func:`sync_buffers`)."""
        sync_buffers(model, self.info)

    def topology(self) -> dict[str, Any]:
        """What a checkpoint records of the saving topology (its manifest's ``topology``)."""
        return {"strategy": self.name, "world_size": self.info.world_size, "device_type": self.info.device.type,
                "launcher": self.info.launcher}


class DataParallelStrategy(Strategy):
    """``nn.DataParallel`` over the visible GPUs of one process. On CPU it still wraps (DataParallel then calls
    the module directly), so the state-dict keys carry the ``module.`` prefix on every machine alike."""

    name = "dp"

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.info.device.type != "cuda":
            _log.info("dp on %s: DataParallel calls the module directly (keys still get 'module.')", self.info.device)
        return nn.DataParallel(model)


class DDPStrategy(Strategy):
    """``DistributedDataParallel`` (``device_ids=[local_rank]`` on CUDA, ``None`` on CPU) over the process group
    of :func:`launcher.setup`."""

    name = "ddp"

    def _wrap(self, model: nn.Module) -> nn.Module:
        _need_group(self.info)
        device_ids = [self.info.device.index] if self.info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=self.find_unused_parameters,
                                       static_graph=self.static_graph)

    def no_sync(self, model: nn.Module) -> ContextManager[Any]:
        return model.no_sync() if isinstance(model, DistributedDataParallel) else nullcontext()

    def settle(self, model: nn.Module, loss: Callable[[], torch.Tensor]) -> None:
        """DDP lays out its gradient buckets twice: by reverse parameter order at construction, then (at the
        second forward) in the order the first backward produced the gradients. Where a parameter sits in the
        flat bucket decides the order in which the ranks' gradients are summed, which changes float rounding
        from 3 ranks on. A run that starts training at step 0 and one that resumes at step K would then use
        different layouts at the same step, and a resumed run would not repeat the uninterrupted one bit for
        bit. So before the first step every run records that order with one pass of zero loss (eval mode: no
        BatchNorm statistics move and no dropout draws from the random streams) and all-reduces zeros; the
        first real step then already trains with the final layout. A collective."""
        if not isinstance(model, DistributedDataParallel):
            return
        was_training = model.training
        model.eval()
        try:
            with torch.enable_grad():
                (loss() * 0.0).backward()
        finally:
            model.zero_grad(set_to_none=True)
            model.train(was_training)


class FSDPStrategy(Strategy):
    """FSDP2 ``fully_shard`` on every block (``FSDP_BLOCKS``; for an MLP every Linear/Conv layer), then on the
    root. Parameters become DTensors sharded on dim 0 over all ranks; buffers stay replicated (see
    :func:`sync_buffers`). The module keeps its class and state-dict keys (FSDP swaps in a subclass).
    ``param_dtype`` (``--amp bf16|fp16``) is the compute dtype of the gathered parameters, as FSDP's
    ``MixedPrecisionPolicy(param_dtype=..., reduce_dtype=float32)``; sharded weights stay float32, and
    BatchNorm layers become units of their own that compute in float32 (their running statistics are)."""

    name = "fsdp"
    shards_parameters = True

    def wrap(self, model: nn.Module) -> nn.Module:
        _need_group(self.info)
        if self.sync_bn:
            model = _sync_batchnorm(model, self.info)
        model = _fully_shard(model.to(self.info.device), self.param_dtype)
        if self.compile:
            self._compile_units(model)
        return model

    @staticmethod
    def _compile_units(model: nn.Module) -> None:
        """Compile the forward of each FSDP unit below the root, after fully_shard.

        Compiling the whole module before fully_shard (what ddp gets) compiles nothing useful here: FSDP's
        all-gather/reshard hooks are dynamo-disabled, so every unit call breaks the graph and the model runs
        eagerly (checked with TORCH_LOGS=graph_code). Compiling each unit's ``forward`` leaves the hooks outside,
        as torchtitan's per-block compile does; the root's own ops (e.g. a ResNet's stem and head) stay eager.
        Only the bound method is replaced: classes and state-dict keys do not change."""
        for m in model.modules():
            if m is not model and is_fsdp(m):
                m.forward = torch.compile(m.forward)

    def unsharded(self, model: nn.Module) -> ContextManager[Any]:
        return unsharded(model)


STRATEGY_CLASSES: dict[str, type[Strategy]] = {c.name: c for c in (Strategy, DataParallelStrategy, DDPStrategy, FSDPStrategy)}


def strategy_for(info: DistInfo, **options: Any) -> Strategy:
    """The ``Strategy`` of ``info.strategy``, with ``options`` (``sync_bn``, ``compile``, ``param_dtype``, ...)."""
    try:
        cls = STRATEGY_CLASSES[info.strategy]
    except KeyError:
        raise LaunchError(f"unknown strategy {info.strategy!r}: use one of {', '.join(STRATEGY_CLASSES)}") from None
    return cls(info, **options)


def wrap_model(model: nn.Module, info: DistInfo, *, sync_bn: bool = False,
               find_unused_parameters: bool = False, static_graph: bool = False,
               param_dtype: torch.dtype | None = None) -> nn.Module:
    """Move ``model`` to ``info.device`` and wrap it for ``info.strategy``: ``strategy_for(info, ...).wrap(model)``.

    Raises:
        LaunchError: ``ddp``/``fsdp`` without a live process group.

    Example:
        >>> net = wrap_model(build_model(cfg), info, sync_bn=args.sync_bn)
    """
    return strategy_for(info, sync_bn=sync_bn, param_dtype=param_dtype, find_unused_parameters=find_unused_parameters,
                        static_graph=static_graph).wrap(model)


def _need_group(info: DistInfo) -> None:
    if not (info.distributed and dist.is_available() and dist.is_initialized()):
        raise LaunchError(
            f"strategy {info.strategy!r} needs the process group of launcher.setup({info.strategy!r}): wrap the model "
            f"inside `with launcher.distributed({info.strategy!r}) as info:` (not after teardown)")


# Blocks that become one FSDP unit each (gathered together in forward): ResNet's residual blocks and the
# U-Net's convolution blocks, by class name, so the launcher needs no import of models. A model without any
# of them (an MLP) gets one unit per Linear/Conv layer.
FSDP_BLOCKS = ("BasicBlock", "Bottleneck", "DoubleConv", "Down", "Up")


def _fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The submodules to shard one by one, innermost first (fully_shard nests: inner units before outer)."""
    blocks = [m for m in model.modules() if type(m).__name__ in FSDP_BLOCKS and m is not model]
    if not blocks:
        blocks = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
                  and m is not model]
    blocks = [b for b in blocks if _self_contained(model, b)]
    return list(reversed(blocks))  # modules() is pre-order: reversed puts children before their parents


def _self_contained(model: nn.Module, unit: nn.Module) -> bool:
    """Whether no parameter of ``unit`` is also held by a module outside it. A tied weight (an output layer
    sharing the embedding's Parameter) split across two FSDP units becomes two DTensors: the tie is silently
    lost. Such a unit is left to the enclosing one (the root), which shards the shared Parameter once."""
    names = {id(m): n for n, m in model.named_modules()}
    prefix = names[id(unit)]
    mine = {id(p) for p in unit.parameters()}
    for name, m in model.named_modules():
        if name == prefix or name.startswith(prefix + "."):
            continue
        if any(id(p) in mine for p in m.parameters(recurse=False)):
            _log.info("fsdp: %s shares a parameter with %s (tied): sharded with the enclosing unit", prefix, name)
            return False
    return True


def _fully_shard(model: nn.Module, param_dtype: torch.dtype | None) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {}
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        # BatchNorm keeps float32 parameters, like its float32 running statistics: its own unit computing in
        # float32 (inputs cast up, as autocast does for BatchNorm); a bf16 weight beside float32 running
        # stats is refused by batch_norm on CPU ("expected scalar type BFloat16 but found Float")
        fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        for norm in [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m is not model]:
            if any(p.requires_grad for p in norm.parameters(recurse=False)):
                fully_shard(norm, mp_policy=fp32)
    units = _fsdp_units(model)
    for unit in units:
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    _log.info("fsdp: %d units + root (%s)", len(units), ", ".join(sorted({type(u).__name__ for u in units})))
    return model


def is_fsdp(model: nn.Module) -> bool:
    """Whether ``model`` was sharded by FSDP2's ``fully_shard`` (its class is swapped for an FSDPModule)."""
    fsdp = _fsdp_module_type()
    return fsdp is not None and isinstance(model, fsdp)


def _fsdp_module_type():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch build without distributed
        return None
    return FSDPModule


@contextmanager
def unsharded(model: nn.Module) -> Iterator[nn.Module]:
    """Gather an FSDP2 model's parameters once and keep them gathered inside the block (no-op otherwise).

    Under FSDP every forward all-gathers each unit, a collective: ranks that run different numbers of
    forwards (exact evaluation over unpadded shards gives one rank a batch more) would hang. Gathered up
    front, forwards need no communication. Every rank must enter and leave together.
    """
    fsdp = _fsdp_module_type()
    units = [m for m in model.modules() if fsdp is not None and isinstance(m, fsdp)]
    if not units:
        yield model
        return
    saved = [[g.post_forward_mesh_info for g in _param_groups(m)] for m in units]
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield model
    finally:
        for m, infos in zip(units, saved):
            m.reshard()
            for g, mesh_info in zip(_param_groups(m), infos):
                g.post_forward_mesh_info = mesh_info  # back to training's reshard-after-forward setting


def _param_groups(unit: nn.Module) -> list:
    """An FSDP2 unit's parameter groups: torch 2.14 keeps a list (``_fsdp_param_groups``), torch <= 2.11 one
    group or None (``_fsdp_param_group``; seen on the H200 check, bench/gpu_check.sh)."""
    state = unit._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is not None:
        return list(groups)
    group = getattr(state, "_fsdp_param_group", None)
    return [group] if group is not None else []


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
    rank still holds the statistics of its own last batch (FSDP keeps buffers replicated, never
    synchronised). Evaluating, or comparing with a checkpoint (which rank 0 writes), needs the replicas
    identical again: call this before evaluation and before saving. Works on bare, DDP and FSDP2 models
    (FSDP shards parameters only; buffers stay plain tensors). No-op without a process group of more than one rank.
    """
    if not info.distributed or info.world_size == 1:
        return
    for buf in model.buffers():
        dist.broadcast(buf.to_local() if hasattr(buf, "to_local") else buf.data, src=0)  # DTensor: its local copy
