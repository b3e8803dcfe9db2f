"""Training entries on disk: one directory ``step-{N}`` holding the model's weights, the other components'
states (``state.safetensors`` + ``state.json``) and a manifest listing every file with its sha256.

Every path that writes an entry commits it through ``storage.commit_dir`` (inside ``atomic_dir``): the
synchronous save and the background writer (``write_entry``, the writer alone) and the sharded save
(``write_sharded_entry``, every rank writing its own rank file into the same temporary directory). So at every
instant ``step-{N}`` is the old or the new complete entry, and an entry whose save was interrupted is never
seen. What happens after the commit (``latest``, pruning: ``policy``) is the caller's ``on_commit``.
"""
from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import collective

from .dtensors import buffer_agreement, shard_layout, tied_keys
from .errors import CheckpointError, agree_written
from .manifest import MANIFEST, TOPOLOGY, build_manifest
from .objstore import S3Path, clear_prefix, publish_directory, staging
from .rank_files import SHARD_FILE, rank_entries, split_state_shards
from .safetensors_io import CODE_OF_NAME, InMemory, dtype_name, write_file
from .states import state_files
from .storage import atomic_dir, atomic_file, atomic_write_text, volatile
from .wrappers import describe_wrapping, unwrap
from .writer import write_directory

if TYPE_CHECKING:
    from torch import nn

MODEL_COMPONENT = "model"


def entry_manifest(step: int, components: Any, metadata: Mapping[str, Any] | None, entries: dict[str, Any],
                   aliases: dict[str, str], info: dict[str, Any]) -> dict[str, Any]:
    """The manifest of entry ``step`` holding ``components`` (names), the model's tensors being ``entries``."""
    manifest = build_manifest(entries, aliases, info, {**(metadata or {}), "step": step})
    manifest["kind"] = "entry"
    manifest["components"] = sorted(components)
    return manifest


def write_entry(path: Path, manifest: dict[str, Any], entries: dict[str, Any], states: dict[str, Any]) -> None:
    """The writer's entry: model files, then the states, then manifest.json, committed in one step. No
    collective here (the background writer runs it). On an object store the entry is written to a local
    staging directory, uploaded, and committed by its manifest, put last (``objstore.publish_directory``)."""
    if isinstance(path, S3Path):
        with staging(path.name) as local:
            with volatile():  # a staging copy: the commit on the store is what makes the entry durable
                write_directory(local, list(entries.items()), manifest, extra_files=state_files(states))
            publish_directory(local, path, commit_name=MANIFEST)
        return
    write_directory(path, list(entries.items()), manifest, extra_files=state_files(states))


def write_sharded_entry(path: Path, step: int, model: nn.Module, components: Any, states: dict[str, Any],
                        metadata: Mapping[str, Any] | None, *, prepare: Callable[[], None],
                        on_commit: Callable[[], None], failure: Callable[[OSError], str]) -> None:
    """Entry ``step`` of a model every rank holds a shard of: each rank writes its own rank file (its shards of
    the weights and of the optimizer state: never gathered) into one temporary directory, in parallel; rank 0
    then writes the states and the manifest (sha256 of every file) and commits the directory. A collective.

    ``prepare`` (the writer, before anything is written: clear leftovers), ``on_commit`` (the writer, after
    the commit: pointers, pruning) and their errors, and every rank's own, reach every rank as one line;
    ``failure`` words an OSError of the writer (what was kept, the fix).
    """
    world, rank = collective.world_size(), collective.rank()
    remote = isinstance(path, S3Path)  # each rank stages its file on its own disk and uploads it
    bare = unwrap(model)
    buffers = buffer_agreement(bare)  # collective: before anything can fail on one rank only
    error: BaseException | None = None
    stack = ExitStack()
    tmp: str | None = None
    if collective.is_writer():
        try:
            prepare()
            if remote:
                clear_prefix(path, commit_name=MANIFEST)
                tmp = str(path)
            else:
                tmp = str(stack.enter_context(atomic_dir(path)))
        except Exception as e:  # noqa: BLE001 -- told to every rank by agree_written()
            error = CheckpointError(failure(e)) if isinstance(e, OSError) else e
    tmp = collective.broadcast_from_writer(tmp)
    sd = bare.state_dict(keep_vars=True)
    states, state_shards = split_state_shards(states)  # sharded optimizer moments: per rank too
    mine: dict[str, Any] = {}
    with ExitStack() as local_stack:
        local = Path(local_stack.enter_context(staging(path.name))) if remote and tmp is not None else \
            Path(tmp) if tmp is not None else None
        if remote and local is not None:
            local.mkdir()
            local_stack.enter_context(volatile())  # staging copies: the store's commit makes the entry durable
        if local is not None:
            try:
                entries, pieces = rank_entries({**sd, **state_shards}, rank)
                name = SHARD_FILE.format(rank=rank, world=world)
                # hashed while written (a helper thread, overlapping the copies and the fsync): not a second
                # pass over the finished file, which cost as much as the write itself
                with atomic_file(local / name, sha256=True) as f:
                    write_file(f, entries, {"format": "pt", "anytopo_rank": f"{rank}/{world}"})
                if remote:
                    (path / name).upload(local / name)  # every rank uploads what it owns
                mine = {"name": name, "bytes": (local / name).stat().st_size, "sha256": f.hexdigest(),
                        "pieces": pieces}
            except Exception as e:  # noqa: BLE001
                mine = {"error": collective.Failure.of(e)}
        reports = collective.gather_objects(mine)
        if collective.is_writer() and error is None:
            try:
                failed = [(r, rep["error"]) for r, rep in enumerate(reports) if "error" in rep]
                if failed:
                    r, why = failed[0]
                    raise CheckpointError(f"rank {r} could not write its shard file ({why.kind}: {why.line})")
                manifest = _sharded_manifest(step, model, sd, state_shards, components, metadata, buffers, reports,
                                             world)
                files = {rep["name"]: {"bytes": rep["bytes"], "sha256": rep["sha256"]} for rep in reports}
                for name, data in state_files(states).items():
                    with atomic_file(local / name, sha256=True) as f:
                        data(f)
                    files[name] = {"bytes": (local / name).stat().st_size, "sha256": f.hexdigest()}
                    if remote:
                        (path / name).upload(local / name)
                manifest["files"] = files
                text = json.dumps(manifest, indent=1, sort_keys=True)
                if remote:
                    (path / MANIFEST).put_bytes(text.encode(), create_only=True)  # the commit
                else:
                    atomic_write_text(local / MANIFEST, text)
                    stack.close()  # the commit: step-N is now the new entry
                on_commit()
            except Exception as e:  # noqa: BLE001
                stack.__exit__(type(e), e, e.__traceback__)  # the temp goes; step-N stays what it was
                error = CheckpointError(failure(e)) if isinstance(e, OSError) else e
        elif error is not None:
            stack.close()
    agree_written(error, path)


def _sharded_manifest(step: int, model: nn.Module, sd: dict[str, Any], state_shards: dict[str, Any], components: Any,
                      metadata: Mapping[str, Any] | None, buffers: dict[str, Any] | None,
                      reports: list[dict[str, Any]], world: int) -> dict[str, Any]:
    """The manifest of a sharded entry: the canonical description of the model's tensors, plus where each
    piece of each tensor lies in which rank file."""
    table: dict[str, Any] = {}
    state_table: dict[str, Any] = {}
    for r, rep in enumerate(reports):
        for key, (offset, shape) in rep["pieces"].items():
            t, where = (sd[key], table) if key in sd else (state_shards[key], state_table)
            entry = where.setdefault(key, {"shape": list(t.shape), "dtype": CODE_OF_NAME[dtype_name(t.dtype)],
                                           "pieces": []})
            entry["pieces"].append([r, offset, shape])
    info = {"wrappers": describe_wrapping(model),
            "device_type": next(iter(sd.values())).device.type if sd else "cpu"}
    if buffers is not None:
        info["buffers"] = buffers
    if any(shard_layout(v) is not None for v in sd.values()):
        info["sharded_state_dict"] = True
    aliases = tied_keys(sd)  # tied weights: stored once, re-tied on load
    manifest = entry_manifest(step, components, metadata,
                              {k: InMemory(v.detach()) for k, v in sd.items() if k not in aliases}, aliases, info)
    manifest[TOPOLOGY]["world_size"] = world
    manifest.update(layout="sharded", sharded={"world_size": world, "files": [rep["name"] for rep in reports],
                                               "tensors": table, **({"states": state_table} if state_table else {})})
    return manifest
