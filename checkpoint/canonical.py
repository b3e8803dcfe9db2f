"""The canonical form of a model's tensors: bare keys (wrappers removed by structure), detached, CPU and
contiguous, tied weights stored once (``dedupe``).

torch is imported by the functions that hold tensors, not here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from .errors import CheckpointError
from .keys import strip_common_wrappers
from .safetensors_io import InMemory
from .sources import group_tied
from .wrappers import describe_wrapping, unwrap

if TYPE_CHECKING:
    import torch
    from torch import nn


def canonical_state(obj: nn.Module | Mapping[str, torch.Tensor], *,
                    to_cpu: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """CPU, contiguous tensors under bare keys, plus what was learned about the source (for the manifest).

    ``to_cpu=False`` leaves each tensor where and as it is (detached): for a caller that copies them into
    buffers of its own (the asynchronous save's snapshot), so a GPU tensor is not copied twice."""
    import torch
    from torch import nn


    info: dict[str, Any] = {}
    if isinstance(obj, nn.Module):
        wrappers = describe_wrapping(obj)
        bare = unwrap(obj)
        sd = bare.state_dict(keep_vars=True)  # detached once below, not twice
        info["wrappers"] = wrappers
        try:
            info["device_type"] = next(iter(bare.parameters())).device.type
        except StopIteration:
            info["device_type"] = "cpu"
    elif isinstance(obj, Mapping):
        bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(f"state dict entries {sorted(map(str, bad))[:5]} are not tensors; save only tensors "
                                  "(put step/epoch/config in metadata=)")
        sd, stripped = strip_common_wrappers(obj)
        if stripped:
            info["prefix_stripped"] = stripped
        types = {v.device.type for v in sd.values()}
        info["device_type"] = types.pop() if len(types) == 1 else "mixed"
    else:
        raise CheckpointError(f"save() takes an nn.Module or a state dict, not {type(obj).__name__}")
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        t = v.detach()
        if not to_cpu:
            out[k] = t
            continue
        if not t.is_cpu:
            t = t.cpu()
        out[k] = t if t.is_contiguous() else t.contiguous()
    return out, info


def dedupe(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store tensors that are the same memory (tied weights) once: returns (unique tensors, alias -> stored key).

    Ties are what ``sources.group_tied`` says they are. Stored tensors that merely overlap in memory
    (views of one storage that are not the same tensor) are cloned so every stored tensor owns its bytes;
    only storages shared by several stored entries are examined (the common case costs one lookup).
    """
    stored, aliases = group_tied({k: InMemory(t) for k, t in sd.items()})
    unique = {k: s.tensor for k, s in stored.items()}
    by_storage: dict[int, list[str]] = {}
    for k, t in unique.items():
        if t.numel():
            by_storage.setdefault(t.untyped_storage().data_ptr(), []).append(k)
    for keys in by_storage.values():
        if len(keys) == 1:  # alone in its storage: overlaps nothing
            continue
        spans: list[tuple[int, int]] = []
        for k in keys:
            t = unique[k]
            start = t.storage_offset() * t.element_size()
            end = start + t.numel() * t.element_size()
            if any(s < end and start < e for s, e in spans):
                unique[k] = t.clone()
            else:
                spans.append((start, end))
    return unique, aliases
