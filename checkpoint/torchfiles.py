"""Files ``torch.save`` wrote, read without running their code; and what kind a file is, from its first bytes.

- ``sniff(path)``: 'safetensors', 'safetensors-truncated', 'zip' (torch.save), 'pickle' or 'unknown';
- ``torch_load(path)``: ``torch.load(weights_only=True)`` with a short allow-list of harmless types real
  checkpoints pickle beside their tensors (``SAFE_GLOBALS``); a file that needs more is refused in one line
  naming what it references, unless the caller opted in with ``allow_pickle``.
"""
from __future__ import annotations

import argparse
import pathlib
import pickle
import pickletools
import re
import struct
import warnings
from pathlib import Path
from typing import Any

from .errors import CheckpointError, first_line

# Types a real checkpoint pickles next to its tensors that cannot run code when rebuilt.
SAFE_GLOBALS = [argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath,
                pathlib.PureWindowsPath]


def sniff(path: Path) -> str:
    """'safetensors', 'zip', 'pickle' or 'unknown', from the first bytes."""
    size = path.stat().st_size
    with path.open("rb") as f:  # a pathlib.Path, or an objstore.S3Path (ranged GETs)
        head = f.read(64)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) > 8 and head[8:].lstrip(b" \t\r\n")[:1] == b"{":  # safetensors allows leading whitespace
        (n,) = struct.unpack("<Q", head[:8])
        if 8 + n <= size:
            return "safetensors"
        return "safetensors-truncated"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def _first_global(path: Path) -> str | None:
    """The first callable a pickle references, found by parsing its opcodes (nothing is executed).

    Legacy ``torch.save`` files are several pickles in a row (magic number, version, sizes, object), so
    successive pickles are scanned. Raises CheckpointError when the first bytes are not a parseable
    pickle (damaged rather than code-carrying).
    """
    with path.open("rb") as f:
        for n in range(5):
            strings: list[str] = []
            try:
                for op, arg, _ in pickletools.genops(f):
                    if op.name == "GLOBAL":
                        return str(arg).replace(" ", ".")
                    if op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        return f"{strings[-2]}.{strings[-1]}"
                    if isinstance(arg, str):
                        strings.append(arg)
            except Exception:
                if n == 0:
                    raise CheckpointError(f"{path}: not a readable torch checkpoint (damaged pickle data); "
                                          "re-copy it or use an earlier checkpoint") from None
                return None
    return None


def _load(path: Path, *, weights_only: bool, mmap: bool) -> Any:
    """torch.load of a local file (mapped when asked), or of an object through its ranged-read file."""
    import torch

    if isinstance(path, Path):
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
    with path.open("rb") as f:
        return torch.load(f, map_location="cpu", weights_only=weights_only)


def torch_load(path: Path, *, allow_pickle: bool, mmap: bool) -> Any:
    """torch.load with weights_only=True; unsafe pickles only with explicit opt-in."""
    import torch

    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS), warnings.catch_warnings():
            # raw pickles (not torch.save) make torch warn about the protocol before refusing them
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return _load(path, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        msg = str(e)
        m = re.search(r"GLOBAL ([\w.]+)", msg)
        culprit = m.group(1) if m else (None if sniff(path) == "zip" else _first_global(path))
        if not allow_pickle:
            if culprit is None and sniff(path) != "zip":
                raise CheckpointError(f"{path}: not a readable torch checkpoint ({first_line(e)}); "
                                      "the file is damaged, re-copy it or use an earlier checkpoint") from None
            what = f" (it references {culprit})" if culprit else ""
            raise CheckpointError(
                f"{path} holds pickled Python objects{what}; loading them can run arbitrary code, so it is refused. "
                "If you trust its source, pass allow_pickle=True (CLI: --allow-pickle) and re-save it with "
                "`anytopo-ckpt convert` to get a safe file") from None
        if m is None and "Weights only load failed" not in msg:
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({first_line(e)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, struct.error) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({first_line(e)}); "
                              "the file is damaged or truncated, re-copy it or use an earlier checkpoint") from None
    # Explicit opt-in: the caller trusts this file.
    try:
        return _load(path, weights_only=False, mmap=False)
    except Exception as e:
        raise CheckpointError(f"{path}: could not unpickle it even with allow_pickle ({first_line(e)}); the file is damaged "
                              "or needs code that is not importable here") from None
