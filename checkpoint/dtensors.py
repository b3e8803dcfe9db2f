"""Sharded models (FSDP2, any DTensor parameters) as checkpoints see them: which tensors are sharded, this
rank's block of a tensor (its shape and global offset), the byte range of a file that holds that block, and
whether the ranks' replicated buffers agree.

A DTensor sharded on dim 0 (FSDP2's layout) owns a contiguous run of rows of the canonical tensor, i.e. one
contiguous byte range of the file; ``local_slice`` turns the file's ``TensorSlice`` into that range, so the
vectored read fills the local shard directly, uneven shards (a dim of 10 at world 3) included.

Never imports torch.distributed itself: a model can only hold DTensors once it is imported.
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Mapping

import collective

from .safetensors_io import TensorSlice

if TYPE_CHECKING:
    import torch
    from torch import nn


def dtensor_type():
    """DTensor's class if torch.distributed.tensor is imported (a model cannot hold DTensors otherwise)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def is_sharded_state(sd: Mapping[str, Any]) -> bool:
    dt = dtensor_type()
    return dt is not None and any(isinstance(v, dt) for v in sd.values())


def buffer_agreement(module: "nn.Module") -> dict[str, Any] | None:
    """Whose buffers (BatchNorm statistics) a checkpoint holds: always rank 0's; and whether every rank had
    the same values (FSDP and DDP keep one replica per rank, which drift apart between syncs). Collective."""
    import torch

    dist = collective.group()
    if dist is None or dist.get_world_size() == 1:
        return None
    bufs = [b.to_local() if hasattr(b, "to_local") else b for b in module.buffers()]
    if not bufs:
        return None
    # exact per-buffer fingerprint: sum and sum of squares in float64 (ints converted exactly below 2**53)
    dev = bufs[0].device
    sig = torch.stack([torch.stack([b.double().sum(), b.double().pow(2).sum()]) for b in bufs]).reshape(-1).to(dev)
    rows = [torch.empty_like(sig) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, sig)
    same = all(torch.equal(rows[0], r) for r in rows[1:])
    return {"from_rank": 0, "identical_on_all_ranks": same, "world_size": dist.get_world_size()}


def shard_layout(t: "torch.Tensor") -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(local shape, global offset) of a DTensor on this rank; None for a plain tensor."""
    if not hasattr(t, "device_mesh") or not hasattr(t, "placements"):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    return compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)


def local_slice(s: TensorSlice, local_shape: tuple[int, ...], offset: tuple[int, ...]) -> TensorSlice | None:
    """The byte range of ``s`` holding rows ``offset[0] : offset[0] + local_shape[0]`` when that is the whole
    shard (sharded on dim 0 only), else None (the caller reads the tensor and slices)."""
    if any(o for o in offset[1:]) or tuple(local_shape[1:]) != tuple(s.shape[1:]):
        return None
    rows = s.shape[0] if s.shape else 1
    row_bytes = s.nbytes // rows if rows else 0
    return TensorSlice(s.path, s.offset + offset[0] * row_bytes, local_shape[0] * row_bytes, s.code,
                       tuple(local_shape))


def local_part(full: "torch.Tensor", local_shape: tuple[int, ...], offset: tuple[int, ...]) -> "torch.Tensor":
    """This rank's block of a full tensor (a view)."""
    view = full
    for dim, (o, n) in enumerate(zip(offset, local_shape)):
        view = view.narrow(dim, o, n)
    return view


def describe_layout(model: "nn.Module", sd: Mapping[str, Any] | None = None) -> str | None:
    """'fsdp x3: 12 tensors sharded on dim 0 (8 uneven), 4 replicated' for a model holding DTensors."""
    dt = dtensor_type()
    if dt is None:  # torch.distributed.tensor never imported: no DTensor can exist (spares a state_dict walk)
        return None
    sd = model.state_dict(keep_vars=True) if sd is None else sd  # the caller's walk, when it has one
    sharded = [v for v in sd.values() if isinstance(v, dt)]
    if not sharded:
        return None
    mesh = sharded[0].device_mesh
    dims: dict[str, int] = {}
    uneven = 0
    for v in sharded:
        for p in v.placements:
            d = getattr(p, "dim", None)
            name = f"dim {d}" if d is not None else type(p).__name__.lower()
            dims[name] = dims.get(name, 0) + 1
            if d is not None and v.shape[d] % mesh.size():
                uneven += 1
    how = ", ".join(f"{n} on {d}" for d, n in sorted(dims.items()))
    return (f"fsdp x{mesh.size()}: {len(sharded)} tensors sharded ({how}; {uneven} uneven), "
            f"{len(sd) - len(sharded)} replicated")


def tied_keys(sd: Mapping[str, "torch.Tensor"]) -> dict[str, str]:
    """alias -> stored key for entries that are the same tensor object (tied parameters: one Parameter, or
    one DTensor under FSDP2, registered under several names); the first key in sorted order is stored.
    Decided from object identity, so every rank decides alike."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for k in sorted(sd):
        if sd[k].numel():
            aliases.update({k: first[id(sd[k])]} if id(sd[k]) in first else {})
            first.setdefault(id(sd[k]), k)
    return aliases
