"""CheckpointManager: pure policy, save/restore of every component, pruning, verified latest, crash safety."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import checkpoint
from checkpoint import CheckpointManager, OptimizerState, select_prune, should_save
from conftest import REPO, child_env


# ------------------------------------------------------------------------------------------ policy

@pytest.mark.parametrize("step,every,last,expected", [
    (0, 10, False, False), (10, 10, False, True), (15, 10, False, False), (15, 10, True, True),
    (7, None, False, False), (7, 0, False, False), (3, 1, False, True),
])
def test_should_save(step, every, last, expected):
    assert should_save(step, every, last=last) is expected


def test_select_prune():
    assert select_prune([1, 2, 3, 4, 5], 2) == [1, 2, 3]
    assert select_prune([5, 1, 3], 2) == [1]
    assert select_prune([1, 2, 3, 4], 2, protect=[1]) == [2]
    assert select_prune([1, 2, 3], None) == [] and select_prune([1, 2, 3], 0) == []
    assert select_prune([1, 2], 5) == []


# ------------------------------------------------------------------------------------------ helpers

def net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def train_steps(model, opt, sched, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x, y = torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()


def components(model, opt, sched, **extra):
    return {"model": model, "optimizer": OptimizerState(model, opt), "scheduler": sched, **extra}


# ------------------------------------------------------------------------------------------ behaviour

def test_save_restore_resumes_identically(tmp_path):
    """Training k steps, saving, restoring into fresh objects and continuing equals training straight through."""
    torch.manual_seed(0)
    a = net()
    opt_a = torch.optim.AdamW(a.parameters(), lr=0.01)
    sched_a = torch.optim.lr_scheduler.StepLR(opt_a, 2, gamma=0.5)
    train_steps(a, opt_a, sched_a, 3)
    mgr = CheckpointManager(tmp_path, keep_last=2)
    mgr.save(3, components(a, opt_a, sched_a, trainer={"epoch": 1, "note": "x"}), metadata={"model": "toy"})
    train_steps(a, opt_a, sched_a, 2, seed=1)

    torch.manual_seed(99)
    b = net()
    opt_b = torch.optim.AdamW(b.parameters(), lr=0.5)  # wrong lr: must be restored
    sched_b = torch.optim.lr_scheduler.StepLR(opt_b, 2, gamma=0.5)
    restored = mgr.restore(mgr.latest(), components(nn.DataParallel(b), opt_b, sched_b, trainer={}))
    assert restored.step == 3 and restored.states["trainer"] == {"epoch": 1, "note": "x"}
    assert sorted(restored.restored) == ["model", "optimizer", "scheduler", "trainer"] and not restored.absent
    assert opt_b.param_groups[0]["lr"] == opt_a.param_groups[0]["lr"] * 2  # scheduler state (one decay later)
    train_steps(b, opt_b, sched_b, 2, seed=1)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=1e-6, atol=1e-7, msg=k)


def test_restore_reads_the_states_beside_the_model_and_reports_the_models_error_first(tmp_path, monkeypatch):
    """The states file is read in a helper thread while the model loads; a model that does not fit is the
    error reported (not whatever the states read met), and no helper thread is left behind."""
    import threading

    from checkpoint import manager as manager_module

    torch.manual_seed(0)
    a = net()
    opt = torch.optim.AdamW(a.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    train_steps(a, opt, sched, 2)
    mgr = CheckpointManager(tmp_path / "ckpts")
    entry = mgr.save(2, components(a, opt, sched))
    threads: list[str] = []
    real = manager_module.read_states

    def spy(path):
        threads.append(threading.current_thread().name)
        return real(path)

    monkeypatch.setattr(manager_module, "read_states", spy)
    b = net()
    opt_b = torch.optim.AdamW(b.parameters(), lr=0.5)
    mgr.restore(entry, components(b, opt_b, torch.optim.lr_scheduler.StepLR(opt_b, 2)))
    assert len(threads) == 1 and threads[0].startswith("anytopo-read-states")
    assert opt_b.state_dict()["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])

    def broken(path):
        raise RuntimeError("the states read failed")

    monkeypatch.setattr(manager_module, "read_states", broken)
    wrong = nn.Sequential(nn.Linear(4, 3))
    opt_w = torch.optim.AdamW(wrong.parameters())
    with pytest.raises(checkpoint.CheckpointError, match="missing|unexpected|shape"):
        mgr.restore(entry, {"model": wrong, "optimizer": OptimizerState(wrong, opt_w)})
    with pytest.raises(RuntimeError, match="the states read failed"):  # the model fits: the states' error
        mgr.restore(entry, components(b, opt_b, torch.optim.lr_scheduler.StepLR(opt_b, 2)))
    assert not [t for t in threading.enumerate() if t.name.startswith("anytopo-read-states")]
    threads.clear()
    monkeypatch.setattr(manager_module, "read_states", spy)
    mgr.restore(entry, {"model": b})  # the model alone: no states to read
    assert threads == []


def test_optimizer_state_is_keyed_by_name_and_survives_regrouping(tmp_path):
    torch.manual_seed(0)
    a = net()
    opt = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    train_steps(a, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), 2)
    state = OptimizerState(nn.DataParallel(a), opt).state_dict()
    names = {n for n, _ in a.named_parameters()}
    assert set(state["state"]) == names  # names of the bare model, no "module."
    mgr = CheckpointManager(tmp_path)
    mgr.save(2, {"model": a, "optimizer": OptimizerState(a, opt)})
    # the new optimizer groups parameters differently (biases apart) and in another order
    b = net()
    params = dict(b.named_parameters())
    groups = [{"params": [params[n] for n in sorted(params) if n.endswith("bias")], "lr": 0.1},
              {"params": [params[n] for n in sorted(params, reverse=True) if n.endswith("weight")], "lr": 0.1}]
    opt_b = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    mgr.restore(None, {"model": b, "optimizer": OptimizerState(b, opt_b)})
    for n, p in b.named_parameters():
        torch.testing.assert_close(opt_b.state[p]["momentum_buffer"], opt.state[dict(a.named_parameters())[n]]["momentum_buffer"])


def test_bare_optimizer_is_refused(tmp_path):
    m = net()
    with pytest.raises(checkpoint.CheckpointError, match="OptimizerState"):
        CheckpointManager(tmp_path).save(1, {"model": m, "optimizer": torch.optim.SGD(m.parameters(), lr=0.1)})


def test_pruning_keeps_last_k_and_the_pointer(tmp_path):
    m = net()
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20, 30, 40):
        mgr.save(step, {"model": m})
    assert [s for s, _ in mgr.entries()] == [30, 40]
    assert (tmp_path / "latest").read_text().strip() == "step-40"
    assert mgr.latest() == tmp_path / "step-40"
    # the step comes from the manifest, not the directory name
    os.rename(tmp_path / "step-30", tmp_path / "renamed")
    assert [s for s, _ in mgr.entries()] == [30, 40]


def test_latest_falls_back_to_newest_entry_that_verifies(tmp_path):
    m = net()
    mgr = CheckpointManager(tmp_path, keep_last=5)
    for step in (1, 2, 3):
        mgr.save(step, {"model": m})
    # corrupt the newest entry without changing its size: the sha256 in its manifest no longer matches
    f = tmp_path / "step-3" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    assert mgr.latest() == tmp_path / "step-2"
    # a pointer to a vanished entry also falls back
    (tmp_path / "latest").write_text("step-9\n")
    assert mgr.latest() == tmp_path / "step-2"
    # restore() of the manager directory itself follows the same rule
    b = net()
    assert mgr.restore(tmp_path, {"model": b}).step == 2
    assert CheckpointManager(tmp_path / "empty").latest() is None
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        CheckpointManager(tmp_path / "empty").restore(None, {"model": b})


def test_restore_reports_absent_components_from_weights_only_file(tmp_path):
    m = net()
    checkpoint.save(m, tmp_path / "w.safetensors")
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    r = CheckpointManager(tmp_path / "run").restore(tmp_path / "w.safetensors",
                                                      {"model": net(), "optimizer": OptimizerState(m, opt)})
    assert r.restored == ["model"] and r.absent == ["optimizer"]


CRASH_CHILD = textwrap.dedent("""
    import os, sys, time, torch
    from torch import nn
    import checkpoint
    mgr = checkpoint.CheckpointManager(sys.argv[1], keep_last=3)
    torch.manual_seed(0)
    small = nn.Linear(8, 8)
    mgr.save(1, {"model": small})
    big = nn.Linear(2048, 2048)   # 16 MB
    real_fsync = os.fsync
    def hang(fd):                 # data of step 2 is written, not yet renamed into place
        print("MIDWAY", flush=True)
        time.sleep(120)
    os.fsync = hang
    mgr.save(2, {"model": big})
    print("FINISHED", flush=True)
""")


@pytest.mark.multiproc
def test_sigkill_mid_save_leaves_previous_latest_loadable(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CRASH_CHILD)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(script), str(run)], cwd=REPO, env=child_env(),
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "MIDWAY"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    leftovers = [p.name for p in run.iterdir()]
    assert "step-2" not in leftovers and any(n.startswith(".step-2") for n in leftovers)  # partial stays hidden
    mgr = CheckpointManager(run, keep_last=3)
    assert mgr.latest() == run / "step-1"
    torch.manual_seed(0)
    expected = nn.Linear(8, 8)
    got = nn.Linear(8, 8)
    mgr.restore(None, {"model": got})
    torch.testing.assert_close(got.weight, expected.weight, rtol=0, atol=0)
    # the next save clears the partial leftovers
    mgr.save(3, {"model": got})
    assert not any(p.name.startswith(".") for p in run.iterdir())
    assert [s for s, _ in mgr.entries()] == [1, 3]


def test_atomic_single_file_save_never_replaces_good_file_with_partial(tmp_path, monkeypatch):
    """A save that fails half-way leaves the previous file byte-identical and no temp behind."""
    path = tmp_path / "w.safetensors"
    checkpoint.save(net(), path)
    before = path.read_bytes()
    writer_module = sys.modules["checkpoint.writer"]

    def broken(f, entries, metadata):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(writer_module, "write_file", broken)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(net(), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_choosing_and_restoring_the_latest_hashes_each_file_once(tmp_path, monkeypatch):
    m = net()
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"model": m})
    manifest_module = sys.modules["checkpoint.manifest"]  # verify_files hashes through it
    calls = []
    real = manifest_module.sha256_file
    monkeypatch.setattr(manifest_module, "sha256_file", lambda p, *a, **k: calls.append(Path(p).name) or real(p, *a, **k))
    restored = mgr.restore(None, {"model": net()})
    assert sorted(calls) == ["model.safetensors", "state.json"]  # verified once by latest(), not again by load
    assert restored.report.checks[0].startswith("sha256 verified")
    calls.clear()
    mgr.restore(tmp_path / "step-1", {"model": net()})  # already verified in this process: no re-hash
    assert calls == []


def test_ema_of_an_entry_without_one_is_refused_in_one_line_and_pointer_files_resolve(tmp_path):
    m = net()
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"model": m, "trainer": {"step": 1}})
    mgr.update_best(1, "accuracy", 0.5)
    for where in (tmp_path / "step-1", tmp_path, tmp_path / "latest", tmp_path / "best"):
        with pytest.raises(checkpoint.CheckpointError, match=r"holds no EMA weights \(components: model, trainer\); "
                                                             "train with --ema DECAY"):
            checkpoint.load_state_dict(where, ema=True)
        sd = checkpoint.load_state_dict(where)  # without ema: the pointer files resolve to the entry too
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in sd.items())
    assert checkpoint.read_manifest(tmp_path / "best")["step"] == 1
    (tmp_path / "best").write_text('{"entry": "step-9", "step": 9, "metric": "accuracy", "value": 1.0}')
    with pytest.raises(checkpoint.CheckpointError, match="points to 'step-9', which is not an entry beside it"):
        checkpoint.load_state_dict(tmp_path / "best")


KILL_COMMIT = """
import os, signal, sys
import torch
from torch import nn
import checkpoint
from checkpoint import storage

directory, mode, point = sys.argv[1], sys.argv[2], sys.argv[3]
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
mgr = checkpoint.CheckpointManager(directory, sharded=True, keep_last=None)
with torch.no_grad():
    for p in model.parameters():
        p.fill_(1.0)
mgr.save(5, {"model": model, "trainer": {"value": "old"}})   # the entry the second save replaces
with torch.no_grad():
    for p in model.parameters():
        p.fill_(2.0)

def die():
    os.kill(os.getpid(), signal.SIGKILL)

real_exchange, real_replace = storage.exchange, os.replace
if mode == "exchange":
    def exchange(a, b):
        if point == "before":
            die()
        done = real_exchange(a, b)
        assert done, "this filesystem cannot exchange: the test needs renameat2(RENAME_EXCHANGE)"
        die()
    storage.exchange = exchange
else:  # a filesystem without an atomic swap: the old entry is parked, then the new one renamed in
    storage.exchange = lambda a, b: False
    def replace(src, dst):
        real_replace(src, dst)
        if ".old-" in os.fspath(dst) and point == "parked":
            die()
        if os.fspath(dst).endswith("step-5") and point == "after":
            die()
    os.replace = replace
mgr.save(5, {"model": model, "trainer": {"value": "new"}})
print("not killed")
"""


@pytest.mark.parametrize("mode,point,expected", [("exchange", "before", 1.0), ("exchange", "after", 2.0),
                                                 ("park", "parked", 1.0), ("park", "after", 2.0)])
def test_a_sharded_save_killed_mid_commit_over_the_same_step_leaves_the_old_or_the_new_entry(tmp_path, mode, point,
                                                                                           expected):
    """Every save path commits through storage.commit_dir: killed at any point of the commit (before or after
    the atomic swap; or, where the filesystem cannot swap, between parking the old entry and renaming the new
    one in), step-5 is afterwards a complete entry, the old one or the new one, and it is what latest() picks."""
    proc = subprocess.run([sys.executable, "-c", KILL_COMMIT, str(tmp_path), mode, point], cwd=REPO,
                          env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr[-3000:]
    if point == "parked":
        assert not (tmp_path / "step-5").exists()  # the instant a two-rename commit leaves no entry at its name
    mgr = CheckpointManager(tmp_path)
    entry = mgr.latest()  # puts a parked entry back, then verifies every file's sha256
    assert entry == tmp_path / "step-5"
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    restored = mgr.restore(entry, {"model": model, "trainer": {}})
    assert all(torch.equal(p, torch.full_like(p, expected)) for p in model.parameters())
    assert restored.states["trainer"]["value"] == ("old" if expected == 1.0 else "new")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".step-5.old")] == []
