"""DCP folders stream: inspect reads only .metadata, load/convert read one tensor at a time through DCP."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import checkpoint
from checkpoint.dcp import DCPTensor
from checkpoint.readers import read_source


@pytest.mark.filterwarnings("ignore")
def test_dcp_inspect_reads_only_metadata_and_tensors_are_read_one_by_one(tmp_path):
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 3))
    dcp.save({"model": net.state_dict()}, checkpoint_id=tmp_path, no_dist=True)
    src = read_source(tmp_path)
    assert all(isinstance(t, DCPTensor) for t in src.tensors.values())  # nothing read yet
    want = {k: v.detach() for k, v in net.state_dict().items()}
    assert {k: list(t.shape) for k, t in src.tensors.items()} == {k: list(v.shape) for k, v in want.items()}
    for k, t in src.tensors.items():
        assert torch.equal(t.read(), want[k]), k
    # the data files are not touched by inspect: it works without them, load names the damage
    for f in tmp_path.glob("*.distcp"):
        f.unlink()
    assert checkpoint.inspect(tmp_path)["num_tensors"] == len(want)
    with pytest.raises(checkpoint.CheckpointError, match="DCP checkpoint"):
        checkpoint.load_state_dict(tmp_path)


@pytest.mark.filterwarnings("ignore")
def test_dcp_block_reads_fill_exactly_the_asked_rows(tmp_path):
    """What a sharded model's rank reads from a DCP folder: a block of rows (uneven, not at 0) of each tensor."""
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    w = torch.randn(10, 7)
    dcp.save({"w": w, "b": torch.randn(10)}, checkpoint_id=tmp_path, no_dist=True)
    src = read_source(tmp_path)
    for offset, rows in ((0, 4), (4, 4), (8, 2)):  # torch.chunk of 10 rows over 3 ranks
        block = torch.empty(rows, 7)
        src.tensors["w"].read_block(block, (rows, 7), (offset, 0))
        assert torch.equal(block, w[offset:offset + rows])


# ------------------------------------------------------- saved chunks read straight from the .distcp files

def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, what
    assert _bytes(got) == _bytes(want), what  # bit for bit


def _reader_asks(monkeypatch) -> list:
    """The saved chunks DCP's FileSystemReader is asked to read from now on (its read items)."""
    from torch.distributed.checkpoint import FileSystemReader

    asked: list = []
    real = FileSystemReader.read_data
    monkeypatch.setattr(FileSystemReader, "read_data",
                        lambda self, plan, planner: (asked.extend(plan.items), real(self, plan, planner))[1])
    return asked


def _no_direct_path(monkeypatch) -> None:
    import checkpoint.dcp as stream

    monkeypatch.setattr(stream, "chunk_data_offset", lambda *a, **k: None)


def _check_reads(src, want: dict[str, torch.Tensor], tmp_path) -> None:
    """Whole tensors (new and into a given tensor), write_to into a file, and the row blocks of each tensor at
    world 3 (torch.chunk: 5 rows are 2 + 2 + 1, 7 are 3 + 3 + 1): all bit for bit."""
    for k, w in want.items():
        t = src.tensors[k]
        _same(t.read(), w, k)
        out = torch.full_like(w, 7)
        assert t.read(out=out) is out
        _same(out, w, k)
        with open(tmp_path / "bytes.bin", "wb") as f:
            t.write_to(f)
        assert (tmp_path / "bytes.bin").read_bytes() == _bytes(w), k
        if w.dim():
            offset = 0
            for part in torch.chunk(torch.arange(w.shape[0]), 3):
                block = torch.full((len(part), *w.shape[1:]), 7, dtype=w.dtype)
                t.read_block(block, tuple(block.shape), (offset,) + (0,) * (w.dim() - 1))
                _same(block, w[offset:offset + len(part)], f"{k} rows {offset}:{offset + len(part)}")
                offset += len(part)


class _Holder(torch.nn.Module):
    """A module whose buffers have the saved names, shapes and dtypes, all zero: what checkpoint.load fills."""

    def __init__(self, like: dict[str, torch.Tensor]):
        super().__init__()
        for k, v in like.items():
            self.register_buffer(k, torch.zeros_like(v))


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "dcp-reader"])
def test_dcp_saved_by_one_process_reads_bit_for_bit_directly_and_through_dcps_reader(tmp_path, monkeypatch, direct):
    import torch.distributed.checkpoint as dcp
    from _dcp_worker import tensors

    want = tensors()  # float32, bfloat16, int64, a 0-dim tensor
    dcp.save(want, checkpoint_id=tmp_path / "dcp", no_dist=True)
    if not direct:
        _no_direct_path(monkeypatch)
    asked = _reader_asks(monkeypatch)
    src = read_source(tmp_path / "dcp")
    _check_reads(src, want, tmp_path)
    holder = _Holder(want)
    assert checkpoint.load(tmp_path / "dcp", holder).ok
    for k, w in want.items():
        _same(getattr(holder, k), w, k)
    assert (asked == []) == direct  # the direct path never asks DCP's reader; the fallback does


@pytest.mark.multiproc
@pytest.mark.timeout(240)
@pytest.mark.filterwarnings("ignore")
def test_dcp_saved_by_two_ranks_reads_bit_for_bit_directly_and_through_dcps_reader(tmp_path, monkeypatch):
    """Row-sharded DTensors saved by 2 ranks (uneven chunks 3 + 2 rows): whole tensors and world-3 blocks that
    straddle the two chunks read the same bytes by the direct path (DCP's reader never asked) and by DCP's."""
    import subprocess

    from _dcp_worker import SHARDED, tensors
    from conftest import BIN, REPO, child_env, free_port

    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO / "tests" / "_dcp_worker.py"), str(tmp_path / "dcp")]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    want = tensors()
    src = read_source(tmp_path / "dcp")
    for k in SHARDED:  # one saved chunk per rank, so blocks and whole reads combine two archives
        rows = [len(p) for p in torch.chunk(torch.arange(want[k].shape[0]), 2)]
        assert [c.sizes[0] for c in src.tensors[k].chunks] == rows, k
    asked = _reader_asks(monkeypatch)
    _check_reads(src, want, tmp_path)
    assert asked == []
    _no_direct_path(monkeypatch)
    _check_reads(read_source(tmp_path / "dcp"), want, tmp_path)
    assert asked


def _deflate_item(directory, fqn: str) -> None:
    """Rewrite the saved archive of ``fqn`` with its storage record deflated (torch.load reads that; its raw
    bytes are no longer in the file): appended to its .distcp file, .metadata pointed at it."""
    import io
    import pickle
    import zipfile

    from checkpoint.dcp import _DCPMetadataUnpickler

    with open(directory / ".metadata", "rb") as f:
        md = _DCPMetadataUnpickler(f).load()
    (info,) = [v for k, v in md.storage_data.items() if k.fqn == fqn]
    path = directory / info.relative_path
    with open(path, "rb") as f:
        f.seek(info.offset)
        old = zipfile.ZipFile(io.BytesIO(f.read(info.length)))
    new = io.BytesIO()
    with zipfile.ZipFile(new, "w") as z:
        for rec in old.infolist():
            z.writestr(rec.filename, old.read(rec),
                       zipfile.ZIP_DEFLATED if "/data/" in rec.filename else zipfile.ZIP_STORED)
    info.offset, info.length = path.stat().st_size, len(new.getvalue())
    with open(path, "ab") as f:
        f.write(new.getvalue())
    with open(directory / ".metadata", "wb") as f:
        pickle.dump(md, f)


@pytest.mark.filterwarnings("ignore")
def test_dcp_layouts_that_are_not_proven_go_through_dcps_reader(tmp_path, monkeypatch):
    """A non-contiguous saved tensor (a transpose keeps its strides) and an archive whose storage record is
    compressed are read by DCP's reader, correctly; the others still directly."""
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    want = {"t": torch.randn(3, 5).t(), "c": torch.randn(4, 2), "ok": torch.randn(6)}
    dcp.save(want, checkpoint_id=tmp_path, no_dist=True)
    _deflate_item(tmp_path, "c")
    asked = _reader_asks(monkeypatch)
    src = read_source(tmp_path)
    for k, w in want.items():
        _same(src.tensors[k].read(), w, k)
    assert sorted({item.storage_index.fqn for item in asked}) == ["c", "t"]


def test_dcp_archive_pickle_is_never_run(tmp_path):
    """A data.pkl that calls anything but torch's tensor rebuild is refused unrun (the caller falls back to
    DCP's reader, whose torch.load(weights_only=True) refuses it too)."""
    import zipfile

    from checkpoint.dcp import chunk_data_offset

    marker = tmp_path / "ran"
    evil = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    with zipfile.ZipFile(tmp_path / "item.distcp", "w") as z:
        z.writestr("archive/data.pkl", evil)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/data/0", bytes(24))
    size = (tmp_path / "item.distcp").stat().st_size
    assert chunk_data_offset(tmp_path / "item.distcp", 0, size, torch.float32, (6,)) is None
    assert not marker.exists()
