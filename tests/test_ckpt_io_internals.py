"""The streaming reader/writer under checkpoint.save/load: short reads, shared-memory entries, early
writeback during saves, and giving back the pages of a memory-mapped .pth while converting it."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
from checkpoint._pages import PageReleaser
from checkpoint._safetensors_io import InMemory, MappedInMemory, read_header, read_slices, write_file
from checkpoint.formats import read_source
from checkpoint._save import build_manifest, write_checkpoint
from conftest import REPO, child_env

IO = sys.modules["checkpoint._safetensors_io"]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range/madvise/proc are Linux")


def test_read_slices_survives_short_reads(tmp_path, monkeypatch):
    sd = {f"t{i}": torch.randn(3 + i, 5) for i in range(6)}
    checkpoint.save(sd, tmp_path / "x.safetensors")
    slices, _ = read_header(tmp_path / "x.safetensors")
    real = os.preadv
    calls = []

    def stingy(fd, buffers, offset):  # the kernel may return fewer bytes than asked
        calls.append(len(buffers))
        return real(fd, [memoryview(buffers[0])[:7]], offset)

    io_module = sys.modules["checkpoint._safetensors_io"]
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
    real = IO._sync_file_range

    def spy(fd, start, length, flags):
        calls.append((start, length, flags))
        return real(fd, start, length, flags)

    monkeypatch.setattr(IO, "_sync_file_range", spy)
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
    assert all(flags == IO._SYNC_FILE_RANGE_WRITE for *_, flags in calls)  # never waits, never replaces fsync
    assert size - (calls[-1][0] + calls[-1][1]) < 64 << 10  # ...up to the last partial chunk
    back = load_file(path)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_writeback_is_skipped_where_the_target_cannot_take_it(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(IO, "WRITEBACK_CHUNK", 1 << 10)
    monkeypatch.setattr(IO, "_sync_file_range", lambda *a: calls.append(a) or -1)  # e.g. EINVAL on this filesystem
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


# ------------------------------------------------------------------------ streaming .pth conversion

def _mapped_rss_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of ``path`` (/proc/self/smaps)."""
    target, total, inside = os.path.realpath(path), 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(maxsplit=5)
            if "-" in first[0] and len(first) >= 5 and not first[0].endswith(":"):
                inside = len(first) == 6 and first[5].strip() == target
            elif inside and first[0] == "Rss:":
                total += int(first[1])
    return total


def _convert_in_process(src_path: Path, dst: Path) -> tuple[object, int]:
    src = read_source(src_path)
    entries = list(src.tensors.items())
    write_checkpoint(dst, entries, build_manifest(dict(entries), {}, {}, None))
    return src, _mapped_rss_kib(src_path)  # src kept alive: its mapping still exists


@linux_only
def test_converting_a_pth_gives_back_each_tensors_pages(tmp_path, monkeypatch):
    base = torch.randn(1 << 20)  # two entries viewing one storage, written separately
    sd = {f"w{i:02d}": torch.randn(256, 256) for i in range(32)}  # 32 x 256 KiB
    sd.update(first_half=base[: 1 << 19], second_half=base[1 << 19:])
    torch.save(sd, tmp_path / "a.pth")
    size_kib = (tmp_path / "a.pth").stat().st_size // 1024
    src, kept = _convert_in_process(tmp_path / "a.pth", tmp_path / "a.safetensors")
    assert all(type(e) is MappedInMemory for e in src.tensors.values())
    back, want = load_file(tmp_path / "a.safetensors"), torch.load(tmp_path / "a.pth", weights_only=True)
    assert set(back) == set(want) and all(torch.equal(back[k], want[k]) for k in want)
    monkeypatch.setattr(PageReleaser, "release", lambda self, t: False)  # what it was before: pages stay mapped
    src2, kept_without = _convert_in_process(tmp_path / "a.pth", tmp_path / "b.safetensors")
    assert kept_without > 0.8 * size_kib, (kept_without, size_kib)
    assert kept < 0.1 * size_kib, (kept, size_kib)
    assert src2.tensors["w00"].read().equal(want["w00"])  # a released tensor reads back from the file


@linux_only
def test_giving_pages_back_never_changes_data_torch_load_rewrote(tmp_path, monkeypatch):
    """A .pth saved with the other byte order is byte-swapped in place by torch.load: its pages become private
    copies that differ from the file. Tied entries are two tensor objects over one storage, so both get
    written; the second must still see the swapped values after the first one's pages were given back."""
    w = torch.arange(3 * 4096, dtype=torch.float32).reshape(3, 4096)  # 48 KiB: whole pages inside
    sd = {"embed.weight": w.detach(), "head.weight": w.detach(), "small": torch.ones(3)}
    monkeypatch.setattr(sys, "byteorder", "big" if sys.byteorder == "little" else "little")
    torch.save(sd, tmp_path / "swapped.pth")  # labelled with the other byte order, as a save on s390x would be
    monkeypatch.undo()
    want = torch.load(tmp_path / "swapped.pth", weights_only=True)
    assert not torch.equal(want["head.weight"], w)  # torch.load swapped the bytes: private copies of the pages
    src, _ = _convert_in_process(tmp_path / "swapped.pth", tmp_path / "out.safetensors")
    assert all(type(e) is MappedInMemory for e in src.tensors.values())
    out = load_file(tmp_path / "out.safetensors")
    assert all(torch.equal(out[k], want[k]) for k in want), {k: torch.equal(out[k], want[k]) for k in want}


_PEAK = """
import runpy, sys
sys.argv = ["checkpoint", *sys.argv[1:]]
try:
    if len(sys.argv) > 1:
        runpy.run_module("checkpoint", run_name="__main__")
    else:  # the baseline: what a .pth convert imports before reading a byte (torch; see test_ckpt_torchfree)
        import torch, checkpoint.cli
except SystemExit as e:
    assert not e.code, e.code
print([l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")][0])
"""


@linux_only
def test_pth_convert_peak_memory_stays_small(tmp_path):
    """End to end: a 256 MB .pth converted by the CLI in a fresh process peaks at < 0.3 x its size over baseline."""
    sd = {f"layer{i:03d}.weight": torch.randn(512, 512) for i in range(256)}  # 256 x 1 MiB
    torch.save(sd, tmp_path / "big.pth")
    del sd
    size_kib = (tmp_path / "big.pth").stat().st_size // 1024

    def peak(*args: str) -> int:
        out = subprocess.run([sys.executable, "-c", _PEAK, *args], cwd=REPO, env=child_env(), check=True,
                             capture_output=True, text=True, timeout=300)
        return int(out.stdout.split()[-1])

    base = peak()
    conv = peak("convert", str(tmp_path / "big.pth"), str(tmp_path / "big.safetensors"))
    assert (tmp_path / "big.safetensors").stat().st_size > size_kib * 1024 * 0.99
    assert conv - base < 0.3 * size_kib, f"convert peak {conv} KiB vs baseline {base} KiB for a {size_kib} KiB file"
