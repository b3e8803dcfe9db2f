"""Load checkpoints into any layout, strictly by default, with a report of what was checked."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._safetensors_io import TensorSlice, read_slices
from ._sharded import describe_layout, local_part, local_slice, shard_layout
from .errors import CheckpointError, and_more
from .formats import Source, check_integrity, read_source
from .keys import match_keys, strip_common_wrappers
from ._unwrap import unwrap

_CAP = 6
# Buffers that torch's own loaders tolerate missing from older files (BatchNorm before torch 0.4.1).
_DEFAULTABLE = ("num_batches_tracked",)


@dataclass
class LoadReport:
    """What ``load`` found, matched, cast and checked. ``str(report)`` is a readable summary."""

    path: str
    format: str
    strict: bool
    device: str
    loaded: int = 0
    prefix_stripped: str = ""
    prefix_added: str = ""
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatches: list[tuple[str, list[int], list[int]]] = field(default_factory=list)  # key, file, model
    dtype_casts: list[tuple[str, str, str]] = field(default_factory=list)  # key, file dtype, model dtype
    defaulted: list[str] = field(default_factory=list)  # missing buffers left at the model's value
    source_topology: dict[str, Any] | None = None
    layout: str | None = None  # the sharded layout loaded into, e.g. "fsdp x3: 4 tensors sharded (4 on dim 0; 2 uneven), 0 replicated"
    source_model: str | None = None
    step: int | None = None
    epoch: int | None = None
    checks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatches)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def __str__(self) -> str:
        lines = [f"loaded {self.loaded} tensors from {self.path} ({self.format}) onto {self.device}"]
        if self.source_topology:
            t = self.source_topology
            lines.append(f"  saved by: {t.get('strategy')} x{t.get('world_size')} on {t.get('device_type')}"
                         + (f", model {self.source_model}" if self.source_model else "")
                         + (f", step {self.step}" if self.step is not None else ""))
            if t.get("buffers"):
                b = t["buffers"]
                lines.append(f"  buffers (BatchNorm statistics): rank {b.get('from_rank', 0)}'s copy, "
                             + ("identical on all" if b.get("identical_on_all_ranks") else "ranks differed; kept rank 0 of")
                             + f" {b.get('world_size')} ranks")
        if self.layout:
            lines.append(f"  loaded into: {self.layout}")
        if self.prefix_stripped or self.prefix_added:
            lines.append(f"  keys: stripped {self.prefix_stripped!r}" + (f", added {self.prefix_added!r}" if self.prefix_added else ""))
        for name in ("missing", "unexpected", "shape_mismatches", "dtype_casts", "defaulted"):
            items = getattr(self, name)
            if items:
                lines.append(f"  {name.replace('_', ' ')}: {len(items)} {_fmt_list(items)}")
        lines.extend(f"  checked: {c}" for c in self.checks)
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def _fmt_list(items: list) -> str:
    return "[" + and_more((i if isinstance(i, str) else f"{i[0]} ({i[1]} vs {i[2]})" for i in items), _CAP) + "]"


def _strict_error(report: LoadReport, model_name: str, *,
                  instead: str = "pass strict=False to load only the matching keys") -> CheckpointError:
    parts = []
    if report.missing:
        parts.append(f"{len(report.missing)} missing {_fmt_list(report.missing)}")
    if report.unexpected:
        parts.append(f"{len(report.unexpected)} unexpected {_fmt_list(report.unexpected)}")
    if report.shape_mismatches:
        parts.append(f"{len(report.shape_mismatches)} shape mismatches (file vs model) {_fmt_list(report.shape_mismatches)}")
    hint = (f"the file was saved from {report.source_model!r}; build that model with the same options"
            if report.source_model else "build the model the checkpoint was saved from")
    return CheckpointError(f"{report.path} does not fit {model_name}: {'; '.join(parts)}. Fix: {hint}, or {instead}")


def _source_info(report: LoadReport, src: Source) -> None:
    m = src.manifest or {}
    report.source_topology = m.get("topology")
    report.source_model = m.get("model")
    report.step = m.get("step")
    report.epoch = m.get("epoch")
    report.notes.extend(src.notes)


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
    _source_info(report, src)

    tsd = target.state_dict(keep_vars=True)  # Parameters themselves: no per-tensor detach (writes are no_grad)
    km = match_keys(src.tensors.keys(), tsd.keys(), prefix=prefix)
    report.prefix_stripped, report.prefix_added = km.strip, km.add
    report.unexpected = km.unexpected
    report.missing = [k for k in km.missing if not k.endswith(_DEFAULTABLE)]
    report.defaulted = [k for k in km.missing if k.endswith(_DEFAULTABLE)]
    plan = []
    for tkey, skey in km.mapping.items():  # ~1000 entries for big models: keep the loop lean
        s, d = src.tensors[skey], tsd[tkey]
        if d.shape != s.shape:  # torch.Size is a tuple: compares with the source's tuple directly
            report.shape_mismatches.append((tkey, list(s.shape), list(d.shape)))
            continue
        same_dtype = s.dtype == d.dtype
        if not same_dtype:
            report.dtype_casts.append((tkey, str(s.dtype).removeprefix("torch."), str(d.dtype).removeprefix("torch.")))
        plan.append((d, s, same_dtype))
    report.shape_mismatches.sort()
    if strict and not report.ok:
        raise _strict_error(report, type(target).__name__)
    report.checks.append(f"keys: {len(plan)}/{len(tsd)} model tensors matched"
                         + (" (strict)" if strict else " (non-strict)"))
    report.layout = describe_layout(target)
    direct: dict[Path, list[tuple[TensorSlice, torch.Tensor]]] = {}
    with torch.no_grad():
        for dst, s, same_dtype in plan:
            layout = shard_layout(dst) if report.layout else None
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
