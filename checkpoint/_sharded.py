"""Sharded models (FSDP2, any DTensor parameters): gather for saving one tensor at a time, read only each
rank's own rows on loading, and make every rank learn whether the writer succeeded.

Saving: every rank walks the same list of entries in the same order (rank 0 decides it and broadcasts it);
each DTensor is all-gathered (``full_tensor``) when the writer reaches it and dropped once written, so no
rank ever holds more than one full tensor beside its shards. The writer writes exactly what a single
process would; the others only take part in the gathers.

Loading: a DTensor sharded on dim 0 (FSDP2's layout) owns a contiguous run of rows of the canonical
tensor, i.e. one contiguous byte range of the file; ``local_slice`` turns the file's ``TensorSlice`` into
that range so the vectored read fills the local shard directly, uneven shards (a dim of 10 at world 3)
included.
"""
from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING, Any, BinaryIO, Mapping

from ._safetensors_io import TensorSlice, _byte_view, dtype_name
from .errors import CheckpointError

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


def _dist():
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def broadcast_from_writer(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (identity without a process group of several ranks)."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class CheckpointWriteError(CheckpointError, OSError):
    """The writer's OSError, worded for users: still an OSError for callers that catch those."""


def agree(error: BaseException | None, path: Any) -> None:
    """After a write: every rank learns rank 0's outcome and fails if it failed (the error's first line).

    Without this a rank other than 0 returned success for a checkpoint that was never written. The writer
    re-raises its own error (an OSError becomes a CheckpointError naming the path and the fix, so scripts
    exit 2 on every rank alike).
    """
    outcome = None
    if error is not None:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        outcome = f"{type(error).__name__}: {first}" if not isinstance(error, CheckpointError) else first
    dist = _dist()
    is_writer = dist is None or dist.get_rank() == 0
    if dist is not None and dist.get_world_size() > 1:
        outcome = broadcast_from_writer(outcome)
        # and every rank past the broadcast before any returns: a root that races ahead to tear down the
        # group while a peer is still receiving aborts that peer in gloo (seen at world 3)
        dist.barrier()
    if is_writer and error is not None:
        if isinstance(error, OSError):
            raise CheckpointWriteError(f"cannot write checkpoint {path}: {error}; choose a writable "
                                  "location (an existing directory you may write to, with free space)") from error
        raise error
    if outcome is not None:
        raise CheckpointError(f"checkpoint {path} was not written: rank 0 failed ({outcome}); fix that and save again")


def buffer_agreement(module: "nn.Module") -> dict[str, Any] | None:
    """Whose buffers (BatchNorm statistics) a checkpoint holds: always rank 0's; and whether every rank had
    the same values (FSDP and DDP keep one replica per rank, which drift apart between syncs). Collective."""
    import torch

    dist = _dist()
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


# ------------------------------------------------------------------------------------------------ save

STREAM_CHUNK = 32 << 20  # bytes per point-to-point message while streaming a shard to the writer


def _chunk_rows(n: int, world: int) -> list[int]:
    """Rows each rank holds of a dim of ``n`` split like ``torch.chunk`` (what FSDP2 and Shard(0) do)."""
    c = -(-n // world) if n else 0
    return [max(0, min(c, n - r * c)) for r in range(world)]


class GatherPlan:
    """The entries to collect, in one order every rank follows.

    A DTensor sharded on dim 0 is streamed to the writer rank by rank in pieces of at most ``STREAM_CHUNK``
    bytes (point-to-point), each written as it arrives: a rank holds its shards plus one piece, however
    large the tensor. Other layouts are all-gathered (``full_tensor``), one tensor at a time.
    """

    def __init__(self, sd: Mapping[str, "torch.Tensor"], order: list[str]):
        self.sd = sd
        self.order = order
        self.pos = 0
        dist = _dist()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)

    def _transfer(self, key: str, sink) -> None:
        """Move ``key``'s bytes, in order, to ``sink(tensor)`` on the writer (None: discard); others send."""
        t = self.sd[key].detach()
        layout = shard_layout(t)
        if layout is None or t.dim() == 0 or any(type(p).__name__ != "Shard" or p.dim != 0 for p in t.placements) \
                or len(t.placements) != 1 or t.device_mesh.size() != self.world:
            full = t.full_tensor() if layout is not None else t  # collective for DTensors
            if sink is not None and self.rank == 0:
                sink(full)
            return
        import torch

        dist = _dist()
        local = t.to_local()
        rest = tuple(t.shape[1:])
        row_bytes = t.element_size() * (math.prod(rest) if rest else 1)
        step = max(1, STREAM_CHUNK // max(1, row_bytes))
        failure: BaseException | None = None
        for r, rows in enumerate(_chunk_rows(t.shape[0], self.world)):
            for a in range(0, rows, step):
                b = min(rows, a + step)
                if r == self.rank and self.rank != 0:
                    dist.send(local[a:b].contiguous(), dst=0)
                elif self.rank == 0:
                    piece = local[a:b] if r == 0 else torch.empty((b - a, *rest), dtype=t.dtype, device=local.device)
                    if r != 0:
                        dist.recv(piece, src=r)
                    if sink is not None and failure is None:
                        try:
                            sink(piece)
                        except Exception as e:  # noqa: BLE001 -- keep receiving, or the senders block forever
                            failure = e
        if failure is not None:
            raise failure

    def _advance(self, key: str) -> None:
        while self.pos < len(self.order) and self.order[self.pos] != key:
            self._transfer(self.order[self.pos], None)
            self.pos += 1
        if self.pos == len(self.order):
            raise CheckpointError(f"internal: tensor {key!r} requested out of the agreed gather order")
        self.pos += 1

    def write(self, key: str, f: BinaryIO) -> None:
        self._advance(key)
        self._transfer(key, lambda piece: f.write(_byte_view(_cpu_contiguous(piece))))

    def fetch(self, key: str) -> "torch.Tensor":
        import torch

        t = self.sd[key]
        self._advance(key)
        parts: list = []
        self._transfer(key, lambda piece: parts.append(_cpu_contiguous(piece).clone()))
        if len(parts) == 1:
            return parts[0].reshape(t.shape)
        return torch.cat(parts).reshape(t.shape) if parts else torch.empty(t.shape, dtype=t.dtype)

    def drain(self) -> None:
        """Take part in every remaining transfer (the non-writers' whole job; the writer's after a failure)."""
        while self.pos < len(self.order):
            self._transfer(self.order[self.pos], None)
            self.pos += 1


def _cpu_contiguous(t: "torch.Tensor") -> "torch.Tensor":
    t = t if t.is_cpu else t.cpu()
    return t if t.is_contiguous() else t.contiguous()


class Gathered:
    """A ``TensorSource`` for one entry of a sharded model: its global shape and dtype, bytes on demand."""

    __slots__ = ("plan", "key", "shape", "_dtype")

    def __init__(self, plan: GatherPlan, key: str, t: "torch.Tensor"):
        self.plan = plan
        self.key = key
        self.shape = tuple(t.shape)
        self._dtype = t.dtype

    @property
    def dtype(self) -> "torch.dtype":
        return self._dtype

    @property
    def dtype_name(self) -> str:
        return dtype_name(self._dtype)

    @property
    def nbytes(self) -> int:
        return self._dtype.itemsize * math.prod(self.shape)

    def read(self, out: "torch.Tensor | None" = None) -> "torch.Tensor":
        t = self.plan.fetch(self.key)
        return t if out is None else out.copy_(t)

    def identity(self) -> object:
        return id(self)

    def write_to(self, f: BinaryIO) -> None:
        self.plan.write(self.key, f)


def sharded_plan(sd: Mapping[str, "torch.Tensor"]) -> tuple[dict[str, Gathered], dict[str, str], GatherPlan]:
    """Entries (file order) and aliases of a sharded state dict, agreed by all ranks. Collective."""
    from ._save import dedupe

    decided: Any
    if _dist() is None or _dist().get_rank() == 0:
        try:
            local = {k: (v.to_local() if hasattr(v, "to_local") else v).detach() for k, v in sd.items()}
            unique, aliases = dedupe(local)  # tied parameters are one DTensor: their local shards share memory
            decided = (list(unique), aliases)
        except Exception as e:  # noqa: BLE001 -- reported on every rank below
            decided = f"{type(e).__name__}: {e}"
    decided = broadcast_from_writer(decided if _dist() is None or _dist().get_rank() == 0 else None)
    if isinstance(decided, str):
        raise CheckpointError(f"cannot plan the save of the sharded model: {decided.splitlines()[0]}")
    order, aliases = decided
    missing = [k for k in order if k not in sd]
    if missing:
        raise CheckpointError(f"ranks hold different models (rank 0 has {missing[:3]}): build the same model on every rank")
    plan = GatherPlan(sd, order)
    return {k: Gathered(plan, k, sd[k]) for k in order}, aliases, plan


# ------------------------------------------------------------------------------------------------ load

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


def describe_layout(model: "nn.Module") -> str | None:
    """'fsdp x3: 12 tensors sharded on dim 0 (8 uneven), 4 replicated' for a model holding DTensors."""
    sd = model.state_dict(keep_vars=True)
    dt = dtensor_type()
    if dt is None:
        return None
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


# --------------------------------------------------------------------------------- sharded checkpoints
#
# CheckpointManager(sharded=True): every rank writes the shards it holds to its own safetensors file
# (``rank-00001-of-00003.safetensors``: canonical key names, local shapes), in parallel; rank 0 adds the
# replicated tensors to its file and writes manifest.json last, listing every rank file with its sha256 and,
# per tensor, its global shape and where each piece sits ("pieces": [[file index, global offset, local shape]]).
# Reading assembles a tensor from its pieces on demand (``ShardedEntry``), so load into any layout, inspect,
# verify and convert work as for any other checkpoint, one tensor at a time.

SHARD_FILE = "rank-{rank:05d}-of-{world:05d}.safetensors"


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


def rank_entries(sd: Mapping[str, "torch.Tensor"], rank: int) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
    """This rank's (key, local tensor source) list and its pieces table {key: [global offset, local shape]}.
    Tied entries (``tied_keys``) are written once, under their stored key."""
    from ._safetensors_io import InMemory

    entries, pieces = [], {}
    aliases = tied_keys(sd)
    for k in sorted(sd):
        if k in aliases:
            continue
        t = sd[k].detach()
        layout = shard_layout(t)
        if layout is None:
            if rank != 0:
                continue  # replicated: rank 0's copy
            local, (shape, offset) = t, (tuple(t.shape), (0,) * t.dim())
        else:
            local = t.to_local()
            shape, offset = layout
            if not local.numel() and t.numel():
                continue  # an uneven split left this rank nothing of k
        local = local.cpu() if not local.is_cpu else local
        entries.append((k, InMemory(local if local.is_contiguous() else local.contiguous())))
        pieces[k] = [list(offset), list(shape)]
    return entries, pieces


class ShardedEntry:
    """One tensor of a sharded checkpoint, assembled from its pieces (``TensorSlice`` of rank files)."""

    __slots__ = ("key", "shape", "code", "pieces")

    def __init__(self, key: str, shape: tuple[int, ...], code: str, pieces: list[tuple[TensorSlice, tuple, tuple]]):
        self.key = key
        self.shape = shape
        self.code = code
        self.pieces = sorted(pieces, key=lambda p: tuple(p[1]))  # (slice, global offset, local shape)

    @property
    def dtype(self) -> "torch.dtype":
        return self.pieces[0][0].dtype

    @property
    def dtype_name(self) -> str:
        return self.pieces[0][0].dtype_name

    @property
    def nbytes(self) -> int:
        return sum(p[0].nbytes for p in self.pieces)

    def identity(self) -> object:
        return id(self)

    def _rows_only(self) -> bool:
        return all(not any(off[1:]) and tuple(shape[1:]) == tuple(self.shape[1:]) for _, off, shape in self.pieces)

    def read(self, out: "torch.Tensor | None" = None) -> "torch.Tensor":
        import torch

        if out is None:
            out = torch.empty(self.shape, dtype=self.dtype)
        self.read_block(out, tuple(self.shape), (0,) * len(self.shape))
        return out

    def read_block(self, dst: "torch.Tensor", shape: tuple, offset: tuple) -> None:
        """Fill ``dst`` (CPU contiguous) with the block at ``offset`` of ``shape``, reading only the pieces'
        byte ranges that overlap it when both are runs of whole rows."""
        from ._safetensors_io import read_slices

        if not dst.numel():
            return
        if self._rows_only() and not any(offset[1:]) and tuple(shape[1:]) == tuple(self.shape[1:]) and dst.is_contiguous():
            lo, hi = offset[0] if offset else 0, (offset[0] + shape[0]) if offset else 1
            by_file: dict[Any, list] = {}
            for s, off, pshape in self.pieces:
                if not self.shape:  # a scalar: one piece, all of it
                    by_file.setdefault(s.path, []).append((s, dst))
                    continue
                a, b = max(lo, off[0]), min(hi, off[0] + pshape[0])
                if a >= b:
                    continue
                part = local_slice(s, (b - a, *pshape[1:]), (a - off[0], *([0] * (len(pshape) - 1))))
                by_file.setdefault(s.path, []).append((part, dst.narrow(0, a - lo, b - a)))
            for path, items in by_file.items():
                read_slices(path, items)
            return
        import torch

        full = torch.empty(self.shape, dtype=self.dtype)
        for s, off, pshape in self.pieces:
            local_part(full, pshape, off).copy_(s.read())
        dst.copy_(local_part(full, shape, offset))

    def write_to(self, f: BinaryIO) -> None:
        if not self._rows_only():
            f.write(_byte_view(self.read()))
            return
        for s, _, _ in self.pieces:  # whole rows in offset order: their bytes concatenated are the tensor's
            s.write_to(f)


def read_sharded(directory, manifest: dict[str, Any], table_name: str = "tensors") -> dict[str, ShardedEntry]:
    """The tensors of a sharded checkpoint directory, from its manifest and its rank files' headers
    (``table_name`` "states": the sharded optimizer-state tensors, keyed ``STATE_SHARD + path``)."""
    from pathlib import Path

    from ._safetensors_io import read_header

    directory = Path(directory)
    table = manifest.get("sharded") or {}
    files, world = table.get("files") or [], table.get("world_size")
    if not files or world != len(files) or (manifest.get("topology") or {}).get("world_size", world) != world:
        raise CheckpointError(f"{directory}: sharded entry mixes world sizes (manifest world {world}, "
                              f"{len(files)} rank files); it was not written by one run: use another entry")
    expect = {SHARD_FILE.format(rank=r, world=world) for r in range(world)}
    if set(files) != expect:
        raise CheckpointError(f"{directory}: rank files {sorted(files)} do not match a world of {world} "
                              f"(expected {sorted(expect)}); the entry mixes runs, use another entry")
    headers = []
    for name in files:
        p = directory / name
        if not p.is_file():
            raise CheckpointError(f"{p}: missing rank file of this sharded checkpoint; re-copy the whole directory "
                                  "or use an earlier checkpoint")
        headers.append(read_header(p)[0])
    out: dict[str, ShardedEntry] = {}
    for key, info in (table.get(table_name) or {}).items():
        pieces = []
        for index, offset, shape in info["pieces"]:
            s = headers[index].get(key)
            if s is None or tuple(s.shape) != tuple(shape):
                raise CheckpointError(f"{directory / files[index]}: lacks its piece of {key!r} (or has the wrong "
                                      "shape); the file belongs to another checkpoint, use an earlier one")
            pieces.append((s, tuple(offset), tuple(shape)))
        out[key] = ShardedEntry(key, tuple(info["shape"]), info["dtype"], pieces)
    return out


# ---------------------------------------------------------------------------- sharded optimizer state
#
# In a sharded entry the optimizer state stays sharded too: each DTensor leaf of a component's state (AdamW's
# exp_avg / exp_avg_sq of a sharded parameter) is written by every rank to its own rank file, under the key
# ``STATE_SHARD + path in the state tree`` (model keys never start with '~'), and the state tree in state.json
# holds ``{"__shard__": key}`` in its place; the manifest's "sharded" table lists each such tensor's global
# shape and pieces under "states", exactly as for the model's tensors. No rank ever gathers the full state.
# Reading puts a ``ShardedEntry`` where the placeholder was: an FSDP model reads only its own block of it
# (``OptimizerState.load_state_dict``), any other layout reads the whole tensor.

STATE_SHARD = "~state/"
SHARD_REF = "__shard__"


def split_state_shards(states: Any, path: str = "") -> tuple[Any, dict[str, "torch.Tensor"]]:
    """``states`` with every DTensor leaf replaced by ``{SHARD_REF: key}``, and those DTensors by key.
    Keys depend only on the tree's structure, so every rank names the same tensor alike."""
    dt = dtensor_type()
    found: dict[str, Any] = {}

    def walk(node: Any, where: str) -> Any:
        if dt is not None and isinstance(node, dt):
            key = STATE_SHARD + where
            found[key] = node
            return {SHARD_REF: key}
        if type(node) is dict:
            return {k: walk(v, f"{where}/{k}" if where else str(k)) for k, v in node.items()}
        if type(node) in (list, tuple):
            return type(node)(walk(v, f"{where}/{i}") for i, v in enumerate(node))
        return node

    return walk(states, path), found


def _is_ref(node: Any) -> bool:
    return type(node) is dict and len(node) == 1 and isinstance(node.get(SHARD_REF), str)


def attach_state_shards(directory, manifest: dict[str, Any], states: Any) -> Any:
    """``states`` read from a sharded entry with each ``{SHARD_REF: key}`` replaced by its ``ShardedEntry``
    (read lazily: whole, or only one rank's block). Unchanged for entries without sharded state."""
    table = (manifest.get("sharded") or {}).get("states")
    if not table:
        return states
    sources = read_sharded(directory, manifest, "states")

    def walk(node: Any) -> Any:
        if _is_ref(node):
            key = node[SHARD_REF]
            if key not in sources:
                raise CheckpointError(f"{directory}: state.json names sharded tensor {key!r}, which the manifest "
                                      "does not list; the entry is damaged, use an earlier checkpoint")
            return sources[key]
        if type(node) is dict:
            return {k: walk(v) for k, v in node.items()}
        if type(node) in (list, tuple):
            return type(node)(walk(v) for v in node)
        return node

    return walk(states)


def materialize_sources(node: Any) -> Any:
    """``node`` with every ``ShardedEntry`` read whole (CPU tensors): the state any layout loads."""
    if isinstance(node, ShardedEntry):
        return node.read()
    if type(node) is dict:
        return {k: materialize_sources(v) for k, v in node.items()}
    if type(node) in (list, tuple):
        return type(node)(materialize_sources(v) for v in node)
    return node


def has_sources(node: Any) -> bool:
    if isinstance(node, ShardedEntry):
        return True
    if type(node) is dict:
        return any(has_sources(v) for v in node.values())
    if type(node) in (list, tuple):
        return any(has_sources(v) for v in node)
    return False


def local_optimizer_state(state: dict[str, Any], params: Mapping[str, "torch.Tensor"]) -> dict[str, Any]:
    """A name-keyed optimizer state whose per-parameter tensors are ``ShardedEntry`` sources, as the sharded
    state ``set_optimizer_state_dict`` takes for an FSDP model: each rank reads only its block of every
    tensor shaped like its (DTensor) parameter and wraps it as a DTensor of that parameter's layout;
    other tensors (AdamW's ``step``) are read whole."""
    from torch.distributed.tensor import DTensor
    import torch

    out = dict(state)
    per_param = {}
    for name, entry in (state.get("state") or {}).items():
        p = params.get(name)
        layout = shard_layout(p) if p is not None else None
        d = {}
        for k, v in entry.items():
            if isinstance(v, ShardedEntry) and layout is not None and tuple(v.shape) == tuple(p.shape):
                local = torch.empty(layout[0], dtype=v.dtype)
                v.read_block(local, *layout)
                d[k] = DTensor.from_local(local.to(p.device), p.device_mesh, p.placements, run_check=False,
                                          shape=p.shape, stride=p.stride())
            else:
                d[k] = materialize_sources(v)
        per_param[name] = d
    out["state"] = per_param
    return materialize_sources(out)
