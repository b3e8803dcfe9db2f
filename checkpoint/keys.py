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

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
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


def strip_common_wrappers(sd: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """A dict (no module structure to unwrap) whose EVERY key starts with a wrapper prefix gets it removed."""
    stripped = ""
    out = dict(sd)
    while out:
        p = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in out)), None)
        if p is None:
            break
        out = {k[len(p):]: v for k, v in out.items()}
        stripped += p
    return out, stripped
