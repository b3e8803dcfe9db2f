"""Match a file's keys to a model's keys by checking candidate prefix changes against the target.

Files saved from wrapped models carry prefixes (``module.`` from DataParallel/DDP, ``_orig_mod.`` from
``torch.compile``, ``model.`` or any attribute name from Lightning modules, in any combination and order).
We never strip blindly: every candidate (strip a leading prefix of the source keys, or add one of the
target's) is scored by how many target keys it matches; the best wins, a tie between different
candidates is reported as ambiguous.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import CheckpointError

# What the wrappers of a live model add to its keys, and which wrapper adds it.
_WRAPPER_REASONS = {"module.": "DataParallel/DDP (also what accelerate's prepare adds)", "_orig_mod.": "torch.compile"}
WRAPPER_PREFIXES = tuple(_WRAPPER_REASONS)
_MAX_DEPTH = 3


@dataclass(frozen=True)
class KeyMatch:
    """How source keys map onto target keys."""

    strip: str = ""
    add: str = ""
    mapping: dict[str, str] = field(default_factory=dict)  # target key -> source key
    missing: list[str] = field(default_factory=list)  # target keys the source lacks
    unexpected: list[str] = field(default_factory=list)  # source keys that map to no target key


def _leading_prefixes(keys) -> dict[str, list[str]]:
    """Each dotted leading prefix (up to _MAX_DEPTH components, never a whole key) -> keys having it."""
    out: dict[str, list[str]] = defaultdict(list)
    for k in keys:
        parts = k.split(".")
        for depth in range(1, min(len(parts) - 1, _MAX_DEPTH) + 1):
            out[".".join(parts[:depth]) + "."].append(k)
    return out


def _apply(source_keys, strip: str, add: str, target: set[str]) -> KeyMatch:
    mapping: dict[str, str] = {}
    unexpected = []
    for k in source_keys:
        if k.startswith(strip):
            t = add + k[len(strip):]
            if t in target and t not in mapping:
                mapping[t] = k
                continue
        unexpected.append(k)
    missing = sorted(target.difference(mapping))
    return KeyMatch(strip, add, mapping, missing, sorted(unexpected))


def match_keys(source_keys, target_keys, *, prefix: str | None = None) -> KeyMatch:
    """Find the prefix change that maps ``source_keys`` onto ``target_keys``.

    Args:
        source_keys: keys found in the file.
        target_keys: keys of the bare (unwrapped) target model.
        prefix: force this prefix to be stripped from the source keys (e.g. ``"student."``) instead of
            searching; ``""`` forces an exact match.

    Returns:
        A ``KeyMatch``; the caller decides whether missing/unexpected keys are fatal.

    Raises:
        CheckpointError: two different prefix changes match equally well (ambiguous).
    """
    source_keys = list(source_keys)
    target = set(target_keys)
    if prefix is not None:  # keys outside the chosen prefix (e.g. a 'teacher.' copy) are not candidates
        return _apply([k for k in source_keys if k.startswith(prefix)], prefix, "", target)
    exact = _apply(source_keys, "", "", target)
    if not exact.missing and not exact.unexpected:
        return exact
    candidates = [exact]
    for p, keys in _leading_prefixes(source_keys).items():
        if any(k[len(p):] in target for k in keys):
            candidates.append(_apply(source_keys, p, "", target))
    source_set = set(source_keys)
    for q, keys in _leading_prefixes(target).items():
        if any(k[len(q):] in source_set for k in keys):
            candidates.append(_apply(source_keys, "", q, target))
    best = max(len(c.mapping) for c in candidates)
    if best == 0:
        return exact
    top = [c for c in candidates if len(c.mapping) == best]
    # Among equally good candidates, one that also leaves nothing unexpected is the unambiguous answer.
    cleanest = min(len(c.unexpected) for c in top)
    top = [c for c in top if len(c.unexpected) == cleanest]
    if len(top) > 1 and all(c.missing for c in top):
        return exact  # no candidate fits the model: a wrong architecture, reported key by key by the caller
    if len(top) > 1:
        options = ", ".join(repr(c.strip) if c.strip else f"add {c.add!r}" for c in top[:4])
        raise CheckpointError(
            f"ambiguous key prefix: stripping {options} each match {best} of {len(target)} model keys; "
            "choose one with prefix='...' (CLI: --prefix ...)")
    return top[0]


# The attribute a format itself puts around the network's keys (see ``wrapper_prefix``).
_FORMAT_ATTRIBUTES = {"lightning": "the LightningModule's only child", "dcp": "the DCP state's 'model' entry"}


def _format_attribute(fmt: str, keys: list[str]) -> str | None:
    """The attribute a format wraps the network in, when every key carries it (else None)."""
    if fmt == "dcp":
        return "model." if all(k.startswith("model.") for k in keys) else None
    if fmt == "lightning":  # a LightningModule whose one child is the network: `self.model = net`
        heads = {k.split(".", 1)[0] for k in keys}
        return heads.pop() + "." if len(heads) == 1 and all("." in k for k in keys) else None
    return None


def wrapper_prefix(keys, fmt: str = "") -> tuple[str, list[str]]:
    """The prefix that wrappers put on EVERY key, with the reason for each part, outermost first.

    Wrapper prefixes (``module.``, ``_orig_mod.``) are recognised for any source, in any order; the
    format's own wrapper attribute (``fmt`` ``"lightning"``: the module's single child; ``"dcp"``: a
    ``model.`` subtree) once, wherever it sits among them. A prefix is taken only when every key carries
    it and no key would become empty.

    Example:
        >>> wrapper_prefix(["model._orig_mod.fc.weight", "model._orig_mod.fc.bias"], "lightning")
        ('model._orig_mod.', ["'model.': the LightningModule's only child", "'_orig_mod.': torch.compile"])
    """
    keys = list(keys)
    prefix, reasons = "", []
    attribute_left = fmt in _FORMAT_ATTRIBUTES
    while keys:
        p = next((p for p in _WRAPPER_REASONS if all(k.startswith(p) and k != p for k in keys)), None)
        reason = _WRAPPER_REASONS.get(p or "")
        if p is None and attribute_left:
            attribute_left = False
            p, reason = _format_attribute(fmt, keys), _FORMAT_ATTRIBUTES[fmt]
        if p is None:
            break
        keys = [k[len(p):] for k in keys]
        prefix += p
        reasons.append(f"{p!r}: {reason}")
    return prefix, reasons


def strip_common_wrappers(sd: Mapping[str, Any], fmt: str = "") -> tuple[dict[str, Any], str]:
    """``sd`` without the prefix ``wrapper_prefix`` finds on every key, and that prefix."""
    prefix, _ = wrapper_prefix(sd, fmt)
    return {k[len(prefix):]: v for k, v in sd.items()}, prefix
