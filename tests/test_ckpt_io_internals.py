"""The streaming reader/writer under checkpoint.save/load: short reads, shared-memory entries, early
writeback during saves."""
from __future__ import annotations

import contextlib
import io
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
from checkpoint.safetensors_io import InMemory, read_header, read_slices, write_file

IO = sys.modules["checkpoint.safetensors_io"]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux")


def test_read_slices_survives_short_reads(tmp_path, monkeypatch):
    sd = {f"t{i}": torch.randn(3 + i, 5) for i in range(6)}
    checkpoint.save(sd, tmp_path / "x.safetensors")
    slices, _ = read_header(tmp_path / "x.safetensors")
    real = os.preadv
    calls = []

    def stingy(fd, buffers, offset):  # the kernel may return fewer bytes than asked
        calls.append(len(buffers))
        return real(fd, [memoryview(buffers[0])[:7]], offset)

    io_module = sys.modules["checkpoint.safetensors_io"]
    monkeypatch.setattr(io_module.os, "preadv", stingy)
    outs = {k: torch.empty_like(v) for k, v in sd.items()}
    read_slices(tmp_path / "x.safetensors", [(slices[k], outs[k]) for k in sd])
    assert calls[0] == 6  # one vectored read for the adjacent run, then the remainder piecewise
    for k in sd:
        assert torch.equal(outs[k], sd[k]), k


def test_entries_sharing_memory_are_stored_once_or_cloned(tmp_path):
    base = torch.arange(12.0)
    sd = {"a": base, "tied": base, "view": base[2:6], "other": torch.ones(2)}
    for name in ("s.safetensors", "s.pth"):
        checkpoint.save(sd, tmp_path / name)
        back = checkpoint.load_state_dict(tmp_path / name)
        assert set(back) == set(sd)
        assert back["tied"] is back["a"]  # tied entries come back as one tensor
        assert torch.equal(back["view"], base[2:6]) and torch.equal(back["a"], base)
    info = checkpoint.inspect(tmp_path / "s.safetensors")
    assert info["manifest"]["aliases"] == {"tied": "a"}
    assert info["bytes"] == (12 + 4 + 2) * 4  # 'tied' not stored twice; the overlapping view is its own copy


# ------------------------------------------------------------------------------------- early writeback

@linux_only
def test_save_hands_each_finished_chunk_to_the_disk(tmp_path, monkeypatch):
    """save() asks the kernel to start writing each WRITEBACK_CHUNK while it copies the next one."""
    calls = []
    real = IO.sync_file_range

    def spy(fd, start, length, flags):
        calls.append((start, length, flags))
        return real(fd, start, length, flags)

    monkeypatch.setattr(IO, "sync_file_range", spy)
    monkeypatch.setattr(IO, "WRITEBACK_CHUNK", 64 << 10)
    sd = {f"w{i}": torch.randn(100, 100 + i) for i in range(12)}  # ~40 KB each, ~490 KB in all
    path = checkpoint.save(sd, tmp_path / "x.safetensors")
    size = path.stat().st_size
    assert len(calls) >= 6, calls
    header_end = size - sum(t.numel() * 4 for t in sd.values())
    assert calls[0][0] == header_end  # from the first data byte...
    for (s0, n0, _), (s1, _, _) in zip(calls, calls[1:]):
        assert s1 == s0 + n0  # ...in consecutive ranges, each at least a chunk...
        assert n0 >= 64 << 10
    assert all(flags == IO.SYNC_FILE_RANGE_WRITE for *_, flags in calls)  # never waits, never replaces fsync
    assert size - (calls[-1][0] + calls[-1][1]) < 64 << 10  # ...up to the last partial chunk
    back = load_file(path)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_writeback_is_skipped_where_the_target_cannot_take_it(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(IO, "WRITEBACK_CHUNK", 1 << 10)
    monkeypatch.setattr(IO, "sync_file_range", lambda *a: calls.append(a) or -1)  # e.g. EINVAL on this filesystem
    sd = {f"w{i}": torch.randn(64, 64) for i in range(4)}
    entries = [(k, InMemory(t)) for k, t in sd.items()]
    buf = io.BytesIO()  # no file descriptor at all
    n = write_file(buf, entries, None)
    assert calls == [] and len(buf.getvalue()) == n
    with open(tmp_path / "x.safetensors", "wb") as f:
        write_file(f, entries, None)
    assert len(calls) == 1  # refused once, then not asked again for this file
    assert buf.getvalue() == (tmp_path / "x.safetensors").read_bytes()
    back = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("inline", [False, True])
def test_hashing_file_digest_equals_the_files_sha256(tmp_path, inline):
    """A file written through atomic_file(sha256=True) reports the sha256 of its bytes on disk, whether hashed
    by a helper thread or, inside inline_hashing() (async saves), on the writing thread, piece by piece
    (a buffer larger than a piece, a numpy view of a tensor, small bytes) -- and inline starts no thread."""
    import hashlib
    import threading

    from checkpoint.storage import INLINE_HASH_CHUNK, atomic_file, inline_hashing

    big = torch.arange(INLINE_HASH_CHUNK // 4 * 2 + 77, dtype=torch.float32)  # 2 pieces and a bit
    threads = []
    with contextlib.ExitStack() as stack:
        if inline:
            stack.enter_context(inline_hashing())
        with atomic_file(tmp_path / "f.bin", sha256=True) as f:
            threads = [t.name for t in threading.enumerate()]
            f.write(b"header")
            f.write(big.numpy().view("uint8"))
            f.write(memoryview(bytearray(b"tail" * 1000)))
        digest = f.hexdigest()
    data = (tmp_path / "f.bin").read_bytes()
    assert len(data) == 6 + big.numel() * 4 + 4000
    assert digest == hashlib.sha256(data).hexdigest()
    assert ("sha256" in threads) is (not inline)
