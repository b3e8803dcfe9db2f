"""``checkpoint.save``: a model (any wrapping, any world size) or a state dict as a canonical checkpoint.

In a distributed run every rank calls it; global rank 0 writes (with a sharded model every rank writes its
own rows into rank 0's file, ``gather``) and every rank learns the outcome before returning, so no rank
reports a checkpoint that was not written (``errors.agree_written``).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import collective

from .canonical import canonical_state, dedupe
from .dtensors import buffer_agreement, is_sharded_state
from .errors import agree_written
from .gather import sharded_plan
from .manifest import build_manifest
from .safetensors_io import InMemory, TensorSource
from .wrappers import describe_wrapping, unwrap
from .writer import write_checkpoint

if TYPE_CHECKING:
    import torch
    from torch import nn


def save(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], path: str | Path, *,
         metadata: Mapping[str, Any] | None = None, max_shard_size: int | str | None = None,
         format: str | None = None) -> Path:
    """Save a model (any wrapping) or a state dict as a canonical, device-agnostic checkpoint.

    Args:
        model_or_state_dict: a bare, DataParallel, DDP or compiled model (unwrapped by structure), or a
            state dict (a common ``module.``/``_orig_mod.`` prefix on every key is removed).
        path: ``x.safetensors`` (default format), ``x.pth``/``.pt``/``.pkl``/``.bin``, or a directory.
        metadata: plain JSON values; ``model``, ``model_options``, ``step``, ``epoch`` and ``topology``
            become manifest fields, anything else goes under ``extra``.
        max_shard_size: e.g. ``"2GB"``; directories only. Shards follow the HF index layout.
        format: ``"safetensors"`` or ``"pth"`` for directory targets.

    Returns:
        The path written. In a distributed run every rank must call this; rank 0 writes (with a sharded
        model every rank writes its own rows into rank 0's file), all learn the outcome.

    Example:
        >>> checkpoint.save(ddp_model, "run/final.safetensors", metadata={"model": "resnet18", "step": 100})
    """
    path = Path(path)

    def write(entries: dict[str, TensorSource], aliases: dict[str, str], info: dict[str, Any]) -> None:
        manifest = build_manifest(entries, aliases, info, metadata)
        write_checkpoint(path, list(entries.items()), manifest, max_shard_size=max_shard_size, fmt=format)

    write_collectively(model_or_state_dict, write, path)
    return path


def write_collectively(obj: nn.Module | Mapping[str, torch.Tensor], write, path: Path, *,
                       to_cpu: bool = True) -> None:
    """Run ``write(entries, aliases, info)`` on the writer (global rank 0) with ``obj``'s canonical tensors;
    every rank must call this (``to_cpu=False``: an unsharded model's tensors are handed over where they
    are, see ``canonical_state``). A sharded model (FSDP2, DTensors) is written while the writer writes its
    files: every rank writes its own rows into each file where it can open it, else streams them to the
    writer, tensor by tensor (``gather.GatherPlan``); then all ranks learn the writer's outcome and
    raise if it failed (``errors.agree_written``), so no rank reports a checkpoint that was not written.
    """
    error: BaseException | None = None
    sd = None
    info: dict[str, Any] = {}
    from torch import nn

    if isinstance(obj, nn.Module):
        bare = unwrap(obj)
        buffers = buffer_agreement(bare)  # collective: before anything can fail on one rank only
        if buffers is not None:
            info["buffers"] = buffers
        if is_sharded_state(dict(bare.named_parameters())):
            sd = bare.state_dict(keep_vars=True)
            info.update(wrappers=describe_wrapping(obj), device_type=_first_device_type(bare))
    elif isinstance(obj, Mapping) and is_sharded_state(obj):
        sd = dict(obj)
        info.update(wrappers=[], device_type=_first_device_type(None, sd), sharded_state_dict=True)
    if sd is not None:
        entries, aliases, plan = sharded_plan(sd)
        if collective.is_writer():
            try:
                write(entries, aliases, info)
            except Exception as e:  # noqa: BLE001 -- told to every rank by agree()
                error = e
            plan.finish()
        else:
            plan.serve()  # rank 0's commands: write this rank's rows into its file, or stream them to it
    elif collective.is_writer():
        try:
            sd_cpu, found = canonical_state(obj, to_cpu=to_cpu)
            unique, aliases = dedupe(sd_cpu)
            write({k: InMemory(t) for k, t in unique.items()}, aliases, {**found, **info})
        except Exception as e:  # noqa: BLE001
            error = e
    agree_written(error, path)


def _first_device_type(module, sd=None) -> str:
    tensors = iter(module.parameters()) if module is not None else iter(sd.values())
    first = next(tensors, None)
    return first.device.type if first is not None else "cpu"
