"""The anytopo manifest: what a checkpoint is, as plain JSON, and the names of the files around it.

Every checkpoint anytopo writes carries one: ``manifest.json`` in a directory, ``<name>.manifest.json``
beside a ``.pth``, or the ``__metadata__`` of a lone safetensors file. It records the format and its version,
the model and its options, step and epoch, the saving topology, dtypes and sizes, tied entries, library
versions, and for a directory every file with its size and sha256. This module owns:

- the format constants (``FORMAT_TAG``, ``MANIFEST``, the ``latest``/``best`` pointer names, ``TOPOLOGY``);
- ``is_ours(obj)``: the one test of "is this an anytopo manifest?";
- ``Manifest``: a typed, read-only view of a manifest dict (``Manifest.of(d)``);
- ``build_manifest``: a new manifest from tensor sources and what was learned about the model;
- ``read_pointer``, ``verify_files``: the pointer files and the sha256 check every reader shares.

Plain Python: no torch.
"""
from __future__ import annotations

import datetime as _dt
import functools
import importlib.metadata
import json
import math
import platform
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import collective

from .errors import CheckpointError
from .safetensors_io import TensorSource
from .storage import child, sha256_file

VERSION = "0.1.0"  # anytopo's, recorded in every manifest (``checkpoint.__version__``)
FORMAT_TAG = "anytopo"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
POINTER = "latest"
BEST_POINTER = "best"  # JSON record next to ``latest``: the entry with the best metric
TOPOLOGY = "topology"  # the manifest key of the saving topology (strategy, world size, device type, wrappers)


def is_ours(obj: Any) -> bool:
    """Whether ``obj`` (parsed JSON) is an anytopo manifest."""
    return isinstance(obj, dict) and obj.get("format") == FORMAT_TAG


@dataclass(frozen=True)
class Manifest:
    """A read-only, typed view of a manifest dict (the dict itself stays the file format).

    Example:
        >>> m = Manifest.of(read_json(entry / MANIFEST))
        >>> m.step, m.topology.get("world_size"), m.sharded
    """

    raw: Mapping[str, Any] = field(repr=False)

    @classmethod
    def of(cls, obj: Any, where: Any = "manifest") -> "Manifest":
        if not is_ours(obj):
            raise CheckpointError(f"{where}: not an anytopo manifest (no \"format\": \"{FORMAT_TAG}\"); the file is "
                                  "damaged or not written by anytopo")
        return cls(obj)

    @property
    def step(self) -> int | None:
        step = self.raw.get("step")
        return step if isinstance(step, int) and not isinstance(step, bool) else None

    @property
    def epoch(self) -> int | None:
        return self.raw.get("epoch")

    @property
    def model(self) -> str | None:
        return self.raw.get("model")

    @property
    def model_options(self) -> dict[str, Any]:
        return dict(self.raw.get("model_options") or {})

    @property
    def topology(self) -> dict[str, Any]:
        return dict(self.raw.get(TOPOLOGY) or {})

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return dict(self.raw.get("files") or {})

    @property
    def weights(self) -> str | None:
        return self.raw.get("weights")

    @property
    def components(self) -> list[str]:
        return list(self.raw.get("components") or [])

    @property
    def is_entry(self) -> bool:
        """A training entry (``CheckpointManager``): model weights plus the components' states."""
        return self.raw.get("kind") == "entry"

    @property
    def sharded(self) -> dict[str, Any] | None:
        """The rank-file table of an entry every rank wrote (``CheckpointManager(sharded=True)``), else None."""
        return self.raw.get("sharded") or None

    @property
    def aliases(self) -> dict[str, str]:
        return dict(self.raw.get("aliases") or {})


@functools.cache
def _versions() -> dict[str, str]:
    """Library versions for the manifest (package metadata lookups take ~1 ms each: once per process)."""
    def dist_version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    return {"anytopo": VERSION, "torch": _torch_version() or dist_version("torch"),
            "safetensors": dist_version("safetensors"), "python": platform.python_version()}


def _torch_version() -> str | None:
    """torch.__version__ with its build tag (e.g. 2.14.1+cu130), without importing torch.

    Package metadata may lack the tag; torch's generated ``torch/version.py`` has it. Read as text.
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.__version__
    for entry in sys.path:
        version_py = Path(entry or ".") / "torch" / "version.py"
        try:
            m = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", version_py.read_text(), re.MULTILINE)
        except OSError:
            continue
        return m.group(1) if m else None
    return None


def topology_of(info: dict[str, Any]) -> dict[str, Any]:
    """The saving topology as the saved object shows it (its wrappers, by structure, and the process group's
    size), for callers that do not say: a training run records its strategy's own (``metadata["topology"]``,
    ``launcher.Strategy.topology``), which takes precedence key by key (``build_manifest``)."""
    world = collective.world_size()
    wrappers = info.get("wrappers") or []
    if "FSDP" in wrappers or info.get("sharded_state_dict"):
        strategy = "fsdp"
    elif "DistributedDataParallel" in wrappers:
        strategy = "ddp"
    elif "DataParallel" in wrappers:
        strategy = "dp"
    else:
        strategy = "ddp" if world > 1 else "single"
    topology = {"strategy": strategy, "world_size": world, "device_type": info.get("device_type", "cpu"),
                "wrappers": wrappers}
    if info.get("buffers"):
        topology["buffers"] = info["buffers"]  # whose BatchNorm statistics these are (rank 0's)
    return topology


def check_json(metadata: Mapping[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(dict(metadata), allow_nan=False))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"metadata must be plain JSON values (str, int, float, bool, None, lists, dicts): {e}; "
                              "convert objects such as argparse.Namespace with vars()") from None


def build_manifest(sources: Mapping[str, TensorSource], aliases: Mapping[str, str], info: dict[str, Any],
                   metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """The manifest: provenance and shape of a checkpoint, as plain JSON (never a pickled object)."""
    meta = check_json(metadata or {})
    dtypes: dict[str, int] = {}
    numel = nbytes = 0
    for t in sources.values():
        name = t.dtype_name
        dtypes[name] = dtypes.get(name, 0) + 1
        n = math.prod(t.shape)
        numel += n
        nbytes += t.nbytes
    topology = {**topology_of(info), **meta.pop(TOPOLOGY, {})}
    manifest: dict[str, Any] = {
        "format": FORMAT_TAG,
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": meta.pop("model", None),
        "model_options": meta.pop("model_options", None),
        "step": meta.pop("step", None),
        "epoch": meta.pop("epoch", None),
        TOPOLOGY: topology,
        "dtypes": dtypes,
        "num_tensors": len(sources) + len(aliases),
        "num_elements": numel,
        "total_bytes": nbytes,
        "aliases": dict(aliases),
        "versions": dict(_versions()),
    }
    if "prefix_stripped" in info:
        manifest["prefix_stripped"] = info["prefix_stripped"]
    if meta:
        manifest["extra"] = meta
    return manifest


def safetensors_metadata(manifest: Mapping[str, Any]) -> dict[str, str]:
    slim = {k: v for k, v in manifest.items() if k not in ("files", "weights")}
    return {"format": "pt", FORMAT_TAG: json.dumps(slim, separators=(",", ":"))}


def manifest_from_metadata(meta: dict[str, str]) -> dict[str, Any] | None:
    raw = meta.get(FORMAT_TAG)
    if raw is None:
        return None
    try:
        m = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return m if isinstance(m, dict) else None


def read_pointer(path: Path) -> str | None:
    """The entry name a ``latest`` pointer file holds, or None when it is missing, empty, torn, binary or
    not a plain name (callers then fall back to scanning for the newest entry that verifies)."""
    try:
        raw = path.read_bytes()[:4096]
    except OSError:
        return None
    try:
        name = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    if not name or "/" in name or "\\" in name or name in (".", "..") or not name.isprintable():
        return None
    return name


def verify_files(directory: Path, manifest: dict[str, Any], *, hashes: bool) -> list[str]:
    """Check every file the manifest lists: present, right size, and (``hashes``) right sha256.

    Returns what was checked, as report lines. Raises CheckpointError on the first problem.
    """
    files = manifest.get("files") or {}
    for name, info in sorted(files.items()):
        p = child(directory, name, listed_in=MANIFEST)
        if not p.is_file():
            raise CheckpointError(f"{p}: missing file listed in {MANIFEST}; the checkpoint is incomplete, "
                                  "re-copy the whole directory or use an earlier checkpoint")
        size = p.stat().st_size
        if size != info.get("bytes", size):
            raise CheckpointError(f"{p}: size {size} bytes, manifest says {info['bytes']}; the file is truncated "
                                  "or was replaced, re-copy it or use an earlier checkpoint")
        if hashes and sha256_file(p) != info.get("sha256"):
            raise CheckpointError(f"{p}: sha256 does not match {MANIFEST}; the file is corrupted or was changed "
                                  "after saving, re-copy it or use an earlier checkpoint")
    if not files:
        return []
    return [f"sha256 verified for {len(files)} file(s)" if hashes else f"sizes verified for {len(files)} file(s)"]
