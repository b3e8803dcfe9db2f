"""DCP folders stream: inspect reads only .metadata, load/convert read one tensor at a time through DCP."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import checkpoint
from checkpoint.formats import DCPTensor, read_source


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
