"""The non-model states of a training entry (optimizer, scheduler, scaler, trainer counters) on disk.

They used to be one ``torch.save`` pickle (``state.pth``) built in a ``BytesIO`` and copied out: two copies
of two thirds of an AdamW checkpoint, and no early writeback. Now they go through the same writer as the
model: every tensor of the nested states into ``state.safetensors`` (straight from memory, writeback
started chunk by chunk), and the structure with its non-tensor leaves into ``state.json``, where each
tensor is ``{"__tensor__": name}``. Reading gives back the same structure, bit for bit and type for type:
``None``/``bool``/``int``/``float`` (NaN and infinities included)/``str`` leaves, lists, tuples, and dicts
whose keys are any of those (an int-keyed ``optimizer.state_dict()`` stays int-keyed). An ``OrderedDict``
(what ``Module.state_dict()`` returns, so an EMA's ``AveragedModel`` state) comes back an ``OrderedDict`` in
its order, with the ``_metadata`` that ``load_state_dict`` reads (module versions); any other ``Mapping``
subclass comes back a ``dict`` with the same items (a type JSON cannot name, and ``weights_only`` could not
load either).

States holding anything else (a pickled object, a dtype safetensors cannot store) are written as
``state.pth`` (``torch.save`` streamed into the atomic file, no staging copy), which is also what older
entries hold; both read back with ``weights_only=True``.
"""
from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable

from .errors import CheckpointError
from .safetensors_io import CODE_OF_NAME, InMemory, dtype_name, read_header, read_slices, write_file
from .torchfiles import SAFE_GLOBALS

if TYPE_CHECKING:
    import torch

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
STATE_PICKLE = "state.pth"  # older entries, and states the two files above cannot hold
STATE_FORMAT = 1
EMA_COMPONENT = "ema"  # the component name of an EMA of the weights (``AveragedModel``): ``load(..., ema=True)``

_TENSOR, _TUPLE, _DICT, _FLOAT = "__tensor__", "__tuple__", "__dict__", "__float__"
_ODICT = "__odict__"  # {"__odict__": [[key, value], ...], "__metadata__": ...}: an OrderedDict, in order
_META = "__metadata__"


class _Unsupported(Exception):
    """A leaf the JSON + safetensors pair cannot hold exactly: fall back to ``state.pth``."""


def _encode_float(x: float) -> Any:
    # json writes NaN/Infinity, which strict readers refuse; tag them so state.json stays standard JSON
    return x if math.isfinite(x) else {_FLOAT: repr(x)}


def flatten_states(states: Any, tensors: dict[str, "torch.Tensor"], path: str = "") -> Any:
    """``states`` as plain JSON, each tensor replaced by ``{"__tensor__": name}`` and put in ``tensors``
    (detached, on CPU, contiguous). Raises ``_Unsupported`` for anything that would not round-trip exactly."""
    import torch

    if states is None or isinstance(states, (bool, str)):
        return states
    if isinstance(states, int) and type(states) is int:
        return states
    if type(states) is float:
        return _encode_float(states)
    if isinstance(states, torch.Tensor):
        if type(states) is not torch.Tensor or states.layout != torch.strided \
                or dtype_name(states.dtype) not in CODE_OF_NAME:
            raise _Unsupported(f"{path}: {type(states).__name__} {states.dtype}")
        name = path or "."
        while name in tensors:  # str() of different keys can meet (1 and "1"); names need only be unique
            name += "'"
        t = states.detach()
        if not t.is_cpu:
            t = t.cpu()
        tensors[name] = t if t.is_contiguous() else t.contiguous()
        return {_TENSOR: name}
    if type(states) is list:
        return [flatten_states(v, tensors, f"{path}/{i}") for i, v in enumerate(states)]
    if type(states) is tuple:
        return {_TUPLE: [flatten_states(v, tensors, f"{path}/{i}") for i, v in enumerate(states)]}
    if isinstance(states, OrderedDict):
        # Module.state_dict() (and so an AveragedModel's): keep the type, the order and _metadata
        tree = {_ODICT: _flatten_items(states, tensors, path)}
        meta = getattr(states, "_metadata", None)
        if meta is not None:
            tree[_META] = flatten_states(dict(meta), tensors, f"{path}/{_META}")
        return tree
    if isinstance(states, Mapping):
        if all(type(k) is str and not k.startswith("__") for k in states):
            return {k: flatten_states(v, tensors, f"{path}/{k}" if path else k) for k, v in states.items()}
        return {_DICT: _flatten_items(states, tensors, path)}
    raise _Unsupported(f"{path}: {type(states).__name__}")


def _flatten_items(states: Mapping, tensors: dict[str, "torch.Tensor"], path: str) -> list:
    import torch

    items = []
    for k, v in states.items():
        if isinstance(k, torch.Tensor) or type(k) not in (str, int, float, bool, tuple, type(None)):
            raise _Unsupported(f"{path}: key of type {type(k).__name__}")
        items.append([flatten_states(k, tensors, path), flatten_states(v, tensors, f"{path}/{k}" if path else str(k))])
    return items


def unflatten_states(tree: Any, tensors: dict[str, "torch.Tensor"]) -> Any:
    """The inverse of ``flatten_states``: ``_decoder``'s rules applied to every object, innermost first."""
    node = _decoder(tensors)

    def walk(x: Any) -> Any:
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, dict):
            return node({k: walk(v) for k, v in x.items()})
        return x

    return walk(tree)


def _decoder(tensors: dict[str, "torch.Tensor"]) -> Callable[[dict], Any]:
    """What one JSON object of ``state.json`` stands for, its members already decoded (``json.loads``'s
    ``object_hook`` order): a tensor, tuple, non-finite float, dict with non-string keys, OrderedDict, or itself."""
    def node(d: dict) -> Any:
        if len(d) == 1:
            (key, value), = d.items()
            if key == _TENSOR:
                if value not in tensors:
                    raise CheckpointError(f"{STATE_JSON} names tensor {value!r}, which {STATE_TENSORS} lacks; "
                                          "the entry is damaged, use an earlier checkpoint")
                return tensors[value]
            if key == _TUPLE:
                return tuple(value)
            if key == _FLOAT:
                return float(value)
            if key == _DICT:
                return {_hashable(k): v for k, v in value}
        if _ODICT in d and set(d) <= {_ODICT, _META}:
            out = OrderedDict((_hashable(k), v) for k, v in d[_ODICT])
            if _META in d:
                out._metadata = d[_META]  # type: ignore[attr-defined]
            return out
        return d

    return node


def _read_tree(path: Path, tensors: dict[str, "torch.Tensor"]) -> Any:
    """``state.json`` parsed and unflattened in one pass: each JSON object goes through ``_decoder`` as the
    parser builds it (innermost first), instead of a second walk over the parsed tree (a ResNet-152 + AdamW
    state has ~2,300 nodes: ~1.5 ms of a restore)."""
    try:
        return json.loads(path.read_text(), object_hook=_decoder(tensors))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e}); the file is damaged or not part of a checkpoint") from None


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, (list, tuple)) else key


def state_files(states: dict[str, Any]) -> dict[str, Callable[[BinaryIO], Any]]:
    """Files (name -> function writing its bytes into an open file) that hold ``states`` in an entry."""
    tensors: dict[str, torch.Tensor] = {}
    try:
        tree = flatten_states(states, tensors)
    except _Unsupported:
        return {STATE_PICKLE: lambda f: _torch_save(states, f)}
    doc = json.dumps({"format_version": STATE_FORMAT, "states": tree}, allow_nan=False, separators=(",", ":"))
    entries = [(k, InMemory(t)) for k, t in tensors.items()]
    files: dict[str, Callable[[BinaryIO], Any]] = {}
    if entries:
        files[STATE_TENSORS] = lambda f: write_file(f, entries, None)
    files[STATE_JSON] = lambda f: f.write(doc.encode())
    return files


def _torch_save(states: dict[str, Any], f: BinaryIO) -> None:
    import torch

    torch.save(to_cpu(states), _CopyingWriter(f))  # only the writer copies to CPU, and only here


class _CopyingWriter:
    """Hands ``f`` an immutable copy of each chunk. torch's zip writer passes views of a buffer it reuses
    after ``write`` returns, while ``f`` (a ``HashingFile``) hashes what it was given later, in a thread."""

    def __init__(self, f: BinaryIO):
        self.f = f

    def write(self, data: Any) -> int:
        return self.f.write(bytes(data))

    def flush(self) -> None:
        self.f.flush()


def read_states(entry: Path) -> dict[str, Any] | None:
    """The states saved in ``entry`` (either layout), or None when it holds none."""
    import torch

    if (entry / STATE_JSON).is_file():
        tensors: dict[str, torch.Tensor] = {}
        if (entry / STATE_TENSORS).is_file():
            slices, _ = read_header(entry / STATE_TENSORS)
            tensors = {k: torch.empty(s.shape, dtype=s.dtype) for k, s in slices.items()}
            read_slices(entry / STATE_TENSORS, [(s, tensors[k]) for k, s in slices.items()])
        doc = _read_tree(entry / STATE_JSON, tensors)
        if not isinstance(doc, dict) or doc.get("format_version") != STATE_FORMAT:
            raise CheckpointError(f"{entry / STATE_JSON}: unknown layout (format_version "
                                  f"{doc.get('format_version') if isinstance(doc, dict) else '?'}); "
                                  "update anytopo to read it")
        return doc["states"]
    if (entry / STATE_PICKLE).is_file():
        with torch.serialization.safe_globals(SAFE_GLOBALS), (entry / STATE_PICKLE).open("rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    return None


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor in it detached and on the CPU (dicts, lists and tuples walked)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def component_tensors(entry: Path, component: str) -> dict[str, Any] | None:
    """The tensors of one component of ``entry`` whose state is a flat mapping of tensors (an EMA's
    ``AveragedModel.state_dict()``), by key, as sources read on demand: slices of ``state.safetensors`` (the
    optimizer's tensors beside them are not read). None when the entry has no such component; an entry in
    the older ``state.pth`` layout is loaded whole (``weights_only``) and the component taken from it."""
    if (entry / STATE_JSON).is_file():
        try:
            doc = json.loads((entry / STATE_JSON).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{entry / STATE_JSON}: unreadable JSON ({e}); the entry is damaged, use an "
                                  "earlier checkpoint") from None
        node = (doc.get("states") or {}).get(component) if isinstance(doc, dict) else None
        if node is None:
            return None
        items = node.get(_ODICT) if isinstance(node, dict) and _ODICT in node else \
            list(node.items()) if isinstance(node, dict) else None
        slices = read_header(entry / STATE_TENSORS)[0] if (entry / STATE_TENSORS).is_file() else {}
        out: dict[str, Any] = {}
        for key, value in items or []:
            name = value.get(_TENSOR) if isinstance(value, dict) and len(value) == 1 else None
            if not isinstance(key, str) or name is None or name not in slices:
                raise CheckpointError(f"{entry}: its {component!r} state is not a mapping of tensors "
                                      f"(entry {key!r}); it cannot be read as model weights")
            out[key] = slices[name]
        return out
    states = read_states(entry)
    state = states.get(component) if isinstance(states, dict) else None
    if state is None:
        return None
    return {k: InMemory(v) for k, v in state.items()}
