"""The streaming reader/writer under checkpoint.save/load: short reads, shared-memory entries."""
from __future__ import annotations

import os
import sys

import torch

import checkpoint
from checkpoint._safetensors_io import read_header, read_slices


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
