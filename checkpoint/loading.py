"""``load`` a checkpoint into any layout, strictly by default, with a report of what was checked (planned by
``plan.plan_load``); ``load_state_dict`` reads one as a canonical state dict."""
from __future__ import annotations

from pathlib import Path


import torch
from torch import nn

from .dtensors import describe_layout, local_part, local_slice, shard_layout
from .keys import strip_common_wrappers
from .plan import LoadReport, plan_load, source_info, strict_error
from .readers import read_source
from .safetensors_io import TensorSlice, read_slices
from .sources import check_integrity
from .wrappers import unwrap

def load(path: str | Path, model: nn.Module, *, strict: bool = True, device: str | torch.device | None = None,
         ema: bool = False, allow_pickle: bool = False, prefix: str | None = None,
         verify: bool = False) -> LoadReport:
    """Load a checkpoint of any supported format into ``model`` in place, whatever wraps it.

    Args:
        path: checkpoint file or directory (anytopo, plain state dict, torchvision, timm, Lightning,
            accelerate, HF sharded, DCP; whole pickled modules need ``allow_pickle``).
        model: bare, DataParallel, DDP or compiled model, on any device.
        strict: every model key must be found with the right shape and no file key left over.
        device: move the model there first (then tensors are copied straight to it); default: stay put.
        ema: take EMA weights where the file has them.
        allow_pickle: permit code-carrying pickles. Only for files you trust.
        prefix: force this key prefix to be stripped instead of detecting it.
        verify: check sha256 of every data file against the manifest (sizes are always checked).

    Returns:
        A ``LoadReport``.

    Raises:
        CheckpointError: unreadable input, or (strict) keys/shapes that do not fit; the message lists them.

    Example:
        >>> report = checkpoint.load("run/checkpoints", nn.DataParallel(build_model("resnet18")))
        >>> print(report)
    """
    if isinstance(model, dict) or not isinstance(model, nn.Module):
        raise TypeError("load() loads into a model; to get tensors use checkpoint.load_state_dict(path)")
    if not callable(getattr(model, "state_dict", None)):
        raise TypeError("model.state_dict was replaced by a non-callable (e.g. `model.state_dict = torch.load(...)`, "
                        "which never loads anything); rebuild the model and use checkpoint.load(path, model)")
    src = read_source(path, ema=ema, allow_pickle=allow_pickle)
    target = unwrap(model)
    if device is not None:
        target.to(device)
    first = next(iter(target.parameters()), None)
    report = LoadReport(str(path), src.format, strict, str(first.device if first is not None else "cpu"))
    report.checks.extend(check_integrity(src, hashes=verify))
    source_info(report, src)

    tsd = target.state_dict(keep_vars=True)  # Parameters themselves: no per-tensor detach (writes are no_grad)
    plan = [(tsd[t], src.tensors[k], same) for t, k, same in plan_load(src, tsd, report, prefix=prefix)]
    if strict and not report.ok:
        raise strict_error(report, type(target).__name__)
    report.checks.append(f"keys: {len(plan)}/{len(tsd)} model tensors matched"
                         + (" (strict)" if strict else " (non-strict)"))
    report.layout = describe_layout(target, tsd)
    direct: dict[Path, list[tuple[TensorSlice, torch.Tensor]]] = {}
    sharded = report.layout is not None
    with torch.no_grad():
        for dst, s, same_dtype in plan:
            layout = shard_layout(dst) if sharded else None
            if layout is not None:  # a DTensor: fill only this rank's shard
                _load_shard(dst.to_local(), s, same_dtype, layout, direct)
                continue
            if same_dtype and type(s) is TensorSlice and dst.is_cpu and dst.is_contiguous():
                direct.setdefault(s.path, []).append((s, dst))
            elif same_dtype and hasattr(s, "read_block") and dst.is_cpu and dst.is_contiguous():
                s.read(out=dst)  # a DCP or rank-file source: straight into the parameter, no staging copy
            else:
                dst.copy_(s.read())
        for file, items in direct.items():
            read_slices(file, items)  # straight from the page cache into the parameters' memory
    report.loaded = len(plan)
    return report


def _load_shard(local: torch.Tensor, s, same_dtype: bool, layout, direct: dict) -> None:
    """This rank's block of source ``s`` into ``local``: its own byte range by the vectored read when the
    shard is a run of whole rows of a safetensors tensor, else the tensor is read and sliced."""
    shape, offset = layout
    if not local.numel():
        return  # an uneven split can leave a rank no rows
    if same_dtype and type(s) is TensorSlice and local.is_cpu and local.is_contiguous():
        part = local_slice(s, shape, offset)
        if part is not None:
            direct.setdefault(s.path, []).append((part, local))
            return
    if same_dtype and hasattr(s, "read_block") and local.is_cpu and local.is_contiguous():
        s.read_block(local, shape, offset)  # a sharded checkpoint: only the pieces overlapping this shard
        return
    local.copy_(local_part(s.read(), shape, offset))


def load_state_dict(path: str | Path, *, ema: bool = False, allow_pickle: bool = False,
                    verify: bool = False) -> dict[str, torch.Tensor]:
    """Read a checkpoint of any supported format as a canonical state dict: CPU tensors, bare keys.

    Wrapper prefixes (``module.``, ``_orig_mod.``) shared by every key are removed; other prefixes (e.g.
    a Lightning attribute) need a target model to be resolved safely: use ``load(path, model)``.
    Tied entries come back as the same tensor object.

    Example:
        >>> sd = checkpoint.load_state_dict("ddp_run.pth")   # keys without "module."
    """
    src = read_source(path, ema=ema, allow_pickle=allow_pickle)
    check_integrity(src, hashes=verify)
    sd, _ = strip_common_wrappers(src.materialize())
    return sd
