"""Sharded entries (``CheckpointManager(sharded=True)``): every rank writes the shards it holds to its own
safetensors file (``rank-00001-of-00003.safetensors``: canonical key names, local shapes), in parallel; rank 0
adds the replicated tensors to its file and the manifest lists every rank file with its sha256 and, per
tensor, its global shape and where each piece sits ("pieces": [[file index, global offset, local shape]]).
Reading assembles a tensor from its pieces on demand (``ShardedEntry``), so load into any layout, inspect,
verify and convert work as for any other checkpoint, one tensor at a time.

The optimizer state stays sharded too: each DTensor leaf of a component's state (AdamW's exp_avg / exp_avg_sq
of a sharded parameter) is written by every rank to its own rank file, under the key ``STATE_SHARD + path in
the state tree`` (model keys never start with '~'), and the state tree in state.json holds
``{"__shard__": key}`` in its place; the manifest's "sharded" table lists each such tensor's global shape and
pieces under "states", exactly as for the model's tensors. No rank ever gathers the full state. Reading puts a
``ShardedEntry`` where the placeholder was: an FSDP model reads only its own block of it
(``OptimizerState.load_state_dict``), any other layout reads the whole tensor.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, BinaryIO, Mapping

from .dtensors import dtensor_type, local_part, local_slice, shard_layout, tied_keys
from .errors import CheckpointError
from .manifest import TOPOLOGY
from .objstore import as_path
from .safetensors_io import InMemory, TensorSlice, byte_view, read_header, read_slices

if TYPE_CHECKING:
    import torch


SHARD_FILE = "rank-{rank:05d}-of-{world:05d}.safetensors"


def rank_entries(sd: Mapping[str, "torch.Tensor"], rank: int) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
    """This rank's (key, local tensor source) list and its pieces table {key: [global offset, local shape]}.
    Tied entries (``tied_keys``) are written once, under their stored key."""
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
            f.write(byte_view(self.read()))
            return
        for s, _, _ in self.pieces:  # whole rows in offset order: their bytes concatenated are the tensor's
            s.write_to(f)


def read_sharded(directory, manifest: dict[str, Any], table_name: str = "tensors") -> dict[str, ShardedEntry]:
    """The tensors of a sharded checkpoint directory, from its manifest and its rank files' headers
    (``table_name`` "states": the sharded optimizer-state tensors, keyed ``STATE_SHARD + path``)."""
    directory = as_path(directory)
    table = manifest.get("sharded") or {}
    files, world = table.get("files") or [], table.get("world_size")
    if not files or world != len(files) or (manifest.get(TOPOLOGY) or {}).get("world_size", world) != world:
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
