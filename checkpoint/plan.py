"""The load planner: which tensors of a checkpoint go to which keys of a model, and what does not fit.

``plan_load`` matches a source's keys to a target's (``keys.match_keys``) and records in a ``LoadReport``
what is missing, left over, of another shape or another dtype. ``checkpoint.load`` and the CLI's
``convert --model`` both plan through it, so they agree on what fits. Plain Python: no torch (the CLI's
``convert`` of safetensors files runs without it).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import CheckpointError, and_more
from .keys import match_keys
from .manifest import Manifest, is_ours
from .sources import Source


_CAP = 6


# Buffers that torch's own loaders tolerate missing from older files (BatchNorm before torch 0.4.1).
DEFAULTABLE = ("num_batches_tracked",)


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


def strict_error(report: LoadReport, model_name: str, *,
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


def source_info(report: LoadReport, src: Source) -> None:
    if is_ours(src.manifest):
        m = Manifest(src.manifest)
        report.source_topology = m.topology or None
        report.source_model = m.model
        report.step = m.step
        report.epoch = m.epoch
    report.notes.extend(src.notes)


def plan_load(src: Source, target: dict[str, Any], report: LoadReport, *,
              prefix: str | None = None) -> list[tuple[str, str, bool]]:
    """Match ``src``'s tensors to ``target`` (a state dict: anything with ``shape`` and ``dtype`` per key) and
    record in ``report`` what does not fit: keys missing (or defaulted: ``DEFAULTABLE`` buffers), left over,
    of another shape, or cast to the target's dtype. Returns (target key, source key, same dtype) for every
    pair that fits, in the target's order."""
    km = match_keys(src.tensors.keys(), target.keys(), prefix=prefix)
    report.prefix_stripped, report.prefix_added = km.strip, km.add
    report.unexpected = km.unexpected
    report.missing = [k for k in km.missing if not k.endswith(DEFAULTABLE)]
    report.defaulted = [k for k in km.missing if k.endswith(DEFAULTABLE)]
    pairs = []
    for tkey, skey in km.mapping.items():  # ~1000 entries for big models: keep the loop lean
        s, d = src.tensors[skey], target[tkey]
        if d.shape != s.shape:  # torch.Size is a tuple: compares with a source's tuple directly
            report.shape_mismatches.append((tkey, list(s.shape), list(d.shape)))
            continue
        same_dtype = s.dtype == d.dtype
        if not same_dtype:
            report.dtype_casts.append((tkey, str(s.dtype).removeprefix("torch."), str(d.dtype).removeprefix("torch.")))
        pairs.append((tkey, skey, same_dtype))
    report.shape_mismatches.sort()
    return pairs
