"""Checkpoints move between topologies: single, DataParallel, DDP (real gloo processes), torch.compile."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import checkpoint
from conftest import BIN, REPO, child_env, free_port

from _ckpt_ddp_worker import fixed_input, make_model

WRAPS = {
    "single": lambda m: m,
    "dp": nn.DataParallel,
}


def trained(seed: int = 1) -> nn.Module:
    m = make_model()
    torch.manual_seed(seed)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for _ in range(2):
        nn.functional.cross_entropy(m(torch.randn(8, 6)), torch.randint(0, 3, (8,))).backward()
        opt.step()
    return m.eval()


def outputs(model: nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(fixed_input())


def fresh() -> nn.Module:
    torch.manual_seed(123)  # different init from the source
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


@pytest.fixture
def world1_group():
    """A real one-process gloo group so DDP can be constructed in-process."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ""])
@pytest.mark.parametrize("src_wrap", ["single", "dp"])
@pytest.mark.parametrize("dst_wrap", ["single", "dp"])
def test_tutorial_combinations_state_dict(tmp_path, suffix, src_wrap, dst_wrap):
    """single->single, single->DP, DP->single, DP->DP, for every file layout."""
    src = trained()
    path = tmp_path / f"ckpt{suffix}"
    checkpoint.save(WRAPS[src_wrap](src), path)
    dst = WRAPS[dst_wrap](fresh())
    assert not torch.equal(outputs(dst), outputs(src))
    report = checkpoint.load(path, dst)
    assert report.ok and report.loaded == len(src.state_dict())
    torch.testing.assert_close(outputs(dst), outputs(src), rtol=0, atol=0)
    # canonical keys: no wrapper prefix in the file whatever saved it
    assert set(checkpoint.load_state_dict(path)) == set(src.state_dict())


@pytest.mark.parametrize("src_wrap", ["single", "dp"])
@pytest.mark.parametrize("dst_wrap", ["single", "dp"])
def test_tutorial_combinations_plain_torch_save(tmp_path, src_wrap, dst_wrap):
    """The tutorial's own files: torch.save(model.state_dict()) with or without 'module.'."""
    src = trained()
    torch.save(WRAPS[src_wrap](src).state_dict(), tmp_path / "sd.pth")
    dst = WRAPS[dst_wrap](fresh())
    report = checkpoint.load(tmp_path / "sd.pth", dst)
    assert report.prefix_stripped == ("module." if src_wrap == "dp" else "")
    torch.testing.assert_close(outputs(dst), outputs(src), rtol=0, atol=0)


@pytest.mark.parametrize("src_wrap", ["single", "dp"])
@pytest.mark.parametrize("dst_wrap", ["single", "dp"])
def test_tutorial_combinations_whole_pickle_opt_in(tmp_path, src_wrap, dst_wrap):
    """torch.save(model) as the tutorial does: refused by default, loads with allow_pickle=True."""
    src = trained()
    torch.save(WRAPS[src_wrap](src), tmp_path / "whole.pth")
    dst = WRAPS[dst_wrap](fresh())
    with pytest.raises(checkpoint.CheckpointError, match="allow_pickle"):
        checkpoint.load(tmp_path / "whole.pth", dst)
    report = checkpoint.load(tmp_path / "whole.pth", dst, allow_pickle=True)
    assert report.format == "pickled-module"
    torch.testing.assert_close(outputs(dst), outputs(src), rtol=0, atol=0)


def test_compiled_source_and_target(tmp_path):
    """A compiled model saves bare keys; a compiled target loads any file; the compiled model runs."""
    src = trained()
    compiled_src = torch.compile(src)
    assert all(k.startswith("_orig_mod.") for k in compiled_src.state_dict())
    checkpoint.save(compiled_src, tmp_path / "c.safetensors")
    assert not any("_orig_mod" in k for k in checkpoint.load_state_dict(tmp_path / "c.safetensors"))
    dst_bare = fresh()
    dst = torch.compile(dst_bare)
    checkpoint.load(tmp_path / "c.safetensors", dst)
    dst.eval()
    with torch.no_grad():
        got = dst(fixed_input())  # the compiled forward really runs with the loaded weights
    torch.testing.assert_close(got, outputs(src), rtol=1e-5, atol=1e-6)
    # a raw torch.save of a compiled model's state_dict (keys "_orig_mod.") loads into a bare model
    torch.save(compiled_src.state_dict(), tmp_path / "raw.pth")
    other = fresh()
    assert checkpoint.load(tmp_path / "raw.pth", other).prefix_stripped == "_orig_mod."
    torch.testing.assert_close(outputs(other), outputs(src), rtol=0, atol=0)


def test_ddp_of_compiled_and_compiled_ddp(tmp_path, world1_group):
    """DDP(compile(m)) and compile(DDP(m)) save bare keys and load from each other and into DP."""
    src = trained()
    ddp_c = nn.parallel.DistributedDataParallel(torch.compile(src))
    c_ddp = torch.compile(nn.parallel.DistributedDataParallel(src))
    assert next(iter(ddp_c.state_dict())).startswith("module._orig_mod.")
    assert next(iter(c_ddp.state_dict())).startswith("_orig_mod.module.")
    assert checkpoint.unwrap(ddp_c) is src and checkpoint.unwrap(c_ddp) is src
    for i, wrapped in enumerate([ddp_c, c_ddp]):
        checkpoint.save(wrapped, tmp_path / f"w{i}.safetensors")
        assert set(checkpoint.load_state_dict(tmp_path / f"w{i}.safetensors")) == set(src.state_dict())
        # raw wrapped state dicts (prefixes in either order) load into the other wrapping
        torch.save(wrapped.state_dict(), tmp_path / f"raw{i}.pth")
        target_bare = fresh()
        target = torch.compile(nn.parallel.DistributedDataParallel(target_bare)) if i == 0 else \
            nn.parallel.DistributedDataParallel(torch.compile(target_bare))
        checkpoint.load(tmp_path / f"raw{i}.pth", target)
        torch.testing.assert_close(outputs(target_bare), outputs(src), rtol=0, atol=0)
    topo = checkpoint.inspect(tmp_path / "w0.safetensors")["manifest"]["topology"]
    assert topo["strategy"] == "ddp" and topo["wrappers"] == ["DistributedDataParallel", "OptimizedModule"]


def _torchrun(args: list[str], nproc: int = 2) -> None:
    cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           str(Path(__file__).parent / "_ckpt_ddp_worker.py"), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.multiproc
def test_real_ddp_save_then_single_process_load_and_reverse(tmp_path):
    # 2-process gloo DDP trains a step and saves; this single process loads the file and the manager entry.
    ckpt = tmp_path / "ddp.safetensors"
    _torchrun(["save", str(ckpt), str(tmp_path / "ddp_out")])
    ranks = [json.loads((tmp_path / f"ddp_out.rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["world"] == 2 and ranks[0]["out"] == ranks[1]["out"]  # DDP kept replicas equal
    expected = torch.tensor(ranks[0]["out"])
    single = fresh()
    report = checkpoint.load(ckpt, single)
    assert report.source_topology["strategy"] == "ddp" and report.source_topology["world_size"] == 2
    torch.testing.assert_close(outputs(single), expected, rtol=1e-6, atol=1e-6)
    mgr = checkpoint.CheckpointManager(str(ckpt) + "-mgr")
    latest = mgr.latest()
    assert latest is not None and latest.name == "step-1"
    single2, opt = fresh(), None
    opt = torch.optim.AdamW(single2.parameters(), lr=0.05)
    restored = mgr.restore(latest, {"model": nn.DataParallel(single2), "optimizer": checkpoint.OptimizerState(single2, opt),
                                    "trainer": {}})
    assert restored.step == 1 and restored.states["trainer"] == {"epoch": 0}
    assert len(opt.state) == len(list(single2.parameters()))  # AdamW moments came back, keyed by name
    torch.testing.assert_close(outputs(single2), expected, rtol=1e-6, atol=1e-6)

    # Reverse: a single-process checkpoint loads into a 2-process DDP model on every rank.
    src = trained(seed=7)
    checkpoint.save(nn.DataParallel(src), tmp_path / "single.pth")
    _torchrun(["load", str(tmp_path / "single.pth"), str(tmp_path / "load_out")])
    for r in range(2):
        got = torch.tensor(json.loads((tmp_path / f"load_out.rank{r}.json").read_text())["out"])
        torch.testing.assert_close(got, outputs(src), rtol=1e-6, atol=1e-6)


def test_load_moves_to_requested_device_and_keeps_tied_weights(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(5, 5, bias=False)
            self.dec = nn.Linear(5, 5, bias=False)
            self.dec.weight = self.enc.weight

    src = Tied()
    checkpoint.save(src, tmp_path / "t.safetensors")
    dst = Tied()
    report = checkpoint.load(tmp_path / "t.safetensors", dst, device="cpu")
    assert report.device == "cpu" and dst.dec.weight is dst.enc.weight
    torch.testing.assert_close(dst.enc.weight, src.enc.weight, rtol=0, atol=0)


def test_state_dict_assignment_mistake_is_caught():
    """The tutorial's `model.state_dict = torch.load(...)` silently loads nothing; our API refuses it."""
    m = fresh()
    m.state_dict = {"0.weight": torch.zeros(16, 6)}
    with pytest.raises(TypeError, match="state_dict was replaced"):
        checkpoint.load("unused", m)
    with pytest.raises(TypeError, match="loads into a model"):
        checkpoint.load("unused", {"0.weight": torch.zeros(1)})
