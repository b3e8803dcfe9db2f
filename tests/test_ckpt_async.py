"""Asynchronous checkpointing (issue 10, item 4): ``CheckpointManager(async_save=True)`` and train.py's
``--async-save``.

What must hold: an async entry holds the same tensors as a sync save of the same state; training that
changes the parameters right after ``save`` returns does not change what is written (the snapshot); at most
one save is in flight; ``latest`` moves only after the entry is durable; a failed background write keeps the
previous entry and ``latest``, and stops every rank of a torchrun x2 run at the next step boundary with one
line, exit 2; pending saves are flushed at exit; a run resumed from async entries repeats the uninterrupted
run bit for bit; the snapshot plan kept between saves is rebuilt whenever the live model differs from it.
"""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import checkpoint
from checkpoint import CheckpointError, CheckpointManager, OptimizerState
from checkpoint import async_save as _async
from checkpoint import resume
from checkpoint.manifest import read_pointer
from checkpoint.safetensors_io import read_header, read_slices
from conftest import BIN, REPO, child_env, free_port, train_py

TRAIN = str(REPO / "scripts" / "train.py")
MLP = ["--model", "mlp", "--data", "digits", "--num-samples", "400", "--batch-size", "32", "--no-progress",
       "--no-tensorboard", "--log-every", "1"]


class Run:
    """A small model after a few AdamW steps: model, optimizer state, scheduler, trainer counters."""

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 0.5 ** s)
        self.trainer: dict = {"step": 0}
        for _ in range(3):
            self.train_step()

    def train_step(self) -> None:
        self.model(torch.randn(8, 16)).pow(2).mean().backward()
        self.opt.step()
        self.opt.zero_grad()
        self.sched.step()
        self.trainer["step"] += 1

    def components(self) -> dict:
        return {"model": self.model, "optimizer": OptimizerState(self.model, self.opt), "scheduler": self.sched,
                "trainer": self.trainer}


def tensors(path: Path) -> dict[str, torch.Tensor]:
    slices, _ = read_header(path)
    out = {k: torch.empty(s.shape, dtype=s.dtype) for k, s in slices.items()}
    read_slices(path, [(s, out[k]) for k, s in slices.items()])
    return out


def assert_same_tensors(a: Path, b: Path) -> None:
    for name in ("model.safetensors", "state.safetensors"):
        ta, tb = tensors(a / name), tensors(b / name)
        assert list(ta) == list(tb), name
        for k in ta:
            assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k].view(-1).view(torch.uint8),
                                                              tb[k].view(-1).view(torch.uint8)), (name, k)
    assert (a / "state.json").read_bytes() == (b / "state.json").read_bytes()


def slow_commits(monkeypatch, seconds: float, log: list | None = None):
    """Make every entry's file writing take ``seconds`` longer (and record concurrency in ``log``)."""
    real = CheckpointManager._commit_entry
    active = [0]

    def slow(self, path, *args, **kwargs):
        active[0] += 1
        if log is not None:
            log.append(("start", path.name, active[0], time.perf_counter()))
        try:
            time.sleep(seconds)
            return real(self, path, *args, **kwargs)
        finally:
            active[0] -= 1
            if log is not None:
                log.append(("end", path.name, active[0], time.perf_counter()))

    monkeypatch.setattr(CheckpointManager, "_commit_entry", slow)


# ------------------------------------------------------------------------------------------ units

def test_async_entry_holds_the_same_tensors_as_a_sync_save(tmp_path):
    run = Run()
    sync = CheckpointManager(tmp_path / "sync").save(3, run.components())
    mgr = CheckpointManager(tmp_path / "async", async_save=True)
    path = mgr.save(3, run.components())
    mgr.flush()
    assert_same_tensors(sync, path)
    assert read_pointer(tmp_path / "async" / "latest") == "step-3"
    fresh = Run(seed=1)
    r = mgr.restore(None, fresh.components())
    assert r.step == 3 and r.states["trainer"] == {"step": 3}
    for a, b in zip(fresh.model.state_dict().values(), run.model.state_dict().values()):
        assert torch.equal(a, b)


def test_background_writes_hash_on_their_own_thread_and_sync_saves_in_a_helper(tmp_path, monkeypatch):
    """An async save's files are hashed on the writer thread (no third thread beside training and the
    writer), a sync save's in a helper thread overlapping the write; both entries verify."""
    from checkpoint import storage as _save

    modes: list[tuple[bool, str]] = []
    init = _save.HashingFile.__init__

    def spy(self, f):
        init(self, f)
        modes.append((self._thread is None, threading.current_thread().name))

    monkeypatch.setattr(_save.HashingFile, "__init__", spy)
    run = Run()
    sync = CheckpointManager(tmp_path / "sync").save(3, run.components())
    assert modes and all(not inline for inline, _ in modes)
    modes.clear()
    mgr = CheckpointManager(tmp_path / "async", async_save=True)
    path = mgr.save(3, run.components())
    mgr.flush()
    assert modes and all(inline and name.startswith("anytopo-ckpt") for inline, name in modes), modes
    from checkpoint.manifest import verify_files
    from checkpoint.storage import read_json

    for entry in (path, sync):  # raises on a size or sha256 that does not match the files
        assert verify_files(entry, read_json(entry / "manifest.json"), hashes=True)


def test_training_right_after_an_async_save_does_not_change_what_is_written(tmp_path, monkeypatch):
    run = Run()
    want = CheckpointManager(tmp_path / "sync").save(3, run.components())
    slow_commits(monkeypatch, 0.3)  # the write starts well after training has moved on
    mgr = CheckpointManager(tmp_path / "async", async_save=True)
    path = mgr.save(3, run.components())
    assert mgr.in_flight()
    for _ in range(2):  # parameters, optimizer moments, scheduler and counters all change in place
        run.train_step()
    with torch.no_grad():
        for p in run.model.parameters():
            p.mul_(-3.0)
    mgr.flush()
    assert_same_tensors(want, path)


def test_overlap_snapshot_copies_weights_and_moments_in_the_background_before_the_next_step(tmp_path, monkeypatch):
    """``overlap_snapshot``: parameters and optimizer state are copied by the writer thread while training runs
    on; the optimizer's next step() waits for that copy; buffers (BatchNorm statistics, which the forward
    pass changes) and the other components are copied by save() itself. The entry is the save-time state."""
    run = Run()
    want = CheckpointManager(tmp_path / "sync").save(3, run.components())
    order: list[str] = []
    deferred: list[int] = []
    real_run = _async.DeferredCopy.run

    forward_done = threading.Event()
    run.model.register_forward_hook(lambda *a: forward_done.set())

    def slow_run(self):
        deferred.append(len(self))
        forward_done.wait(timeout=30)  # the copy is made only after the next forward pass changed BN statistics
        time.sleep(0.1)  # ... and while its backward runs
        real_run(self)
        order.append("copied")

    monkeypatch.setattr(_async.DeferredCopy, "run", slow_run)
    mgr = CheckpointManager(tmp_path / "async", async_save=True, overlap_snapshot=True)
    path = mgr.save(3, run.components())  # registers the manager's step pre-hook
    run.opt.register_step_pre_hook(lambda *a: order.append("step"))  # runs after the manager's
    for _ in range(2):  # BN statistics change in the forward pass, weights and moments in the step
        run.train_step()
    with torch.no_grad():  # after the step: the snapshot is complete, anything may change
        for p in run.model.parameters():
            p.mul_(-3.0)
    mgr.flush()
    assert_same_tensors(want, path)
    assert order[:2] == ["copied", "step"], order
    n_params = len(list(run.model.parameters()))
    assert deferred == [n_params + 3 * n_params]  # every weight and AdamW's exp_avg, exp_avg_sq and step
    order.clear()
    forward_done.set()
    mgr.save(5, run.components())  # the hook is registered once: one wait per step, not one per save
    mgr.wait_snapshot()
    assert order == ["copied"]
    run.train_step()
    assert order == ["copied", "step"]
    mgr.flush()
    assert len(run.opt._optimizer_step_pre_hooks) == 2


def test_buffers_are_reused_across_saves_and_not_pinned_for_cpu_state(tmp_path):
    run = Run()
    mgr = CheckpointManager(tmp_path, async_save=True, keep_last=0)
    mgr.save(1, run.components())
    bg = mgr._background
    first = (bg.model_pool.allocated, bg.state_pool.allocated)
    assert first[0] > 0 and first[1] > 0
    buffers = [b for b, _ in bg.model_pool._buffers]
    run.train_step()
    mgr.save(2, run.components())
    mgr.flush()
    assert (bg.model_pool.allocated, bg.state_pool.allocated) == first  # no new buffer for the same state
    assert all(a is b for a, (b, _) in zip(buffers, bg.model_pool._buffers))
    assert not any(pinned or b.is_pinned() for b, pinned in bg.model_pool._buffers + bg.state_pool._buffers)
    assert_same_tensors(CheckpointManager(tmp_path / "sync").save(2, run.components()), tmp_path / "step-2")


def test_a_snapshot_keeps_a_module_state_dicts_versions():
    # an EMA component's state is a Module.state_dict (an OrderedDict whose _metadata holds the versions its
    # load_state_dict reads): the async snapshot must keep them, as the sync state writer does
    state = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).state_dict()
    snap = _async.snapshot_tree({"ema": state}, _async.BufferPool())
    assert list(snap["ema"]) == list(state)
    assert snap["ema"]._metadata == state._metadata and snap["ema"]._metadata is not state._metadata


def model_entry_matches_a_sync_save(model: nn.Module, entry: Path, where: Path) -> None:
    """The model file of ``entry`` holds what a synchronous save of ``model`` writes now (tensors and ties)."""
    want = checkpoint.save(model, where / "sync.safetensors")
    a, b = tensors(want), tensors(entry / "model.safetensors")
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert checkpoint.inspect(want)["manifest"]["aliases"] == checkpoint.inspect(entry)["manifest"]["aliases"]


def test_the_snapshot_plan_is_kept_between_saves_and_rebuilt_when_the_model_changes(tmp_path):
    run = Run()
    mgr = CheckpointManager(tmp_path / "a", async_save=True, keep_last=0)
    comps = {"model": run.model, "trainer": run.trainer}
    mgr.save(1, comps)
    run.train_step()
    mgr.save(2, comps)
    mgr.flush()
    plan = mgr._background.model_plan
    assert plan.builds == 1  # the second save only checked it
    model_entry_matches_a_sync_save(run.model, tmp_path / "a" / "step-2", tmp_path)
    changes = {  # each would be written stale (or untied) by a plan that is not checked against the live model
        "a parameter replaced": lambda m: setattr(m[0], "bias", nn.Parameter(torch.randn(32))),
        "a parameter's memory swapped (.data =)": lambda m: setattr(m[3].weight, "data", torch.randn(4, 32)),
        "a tie made": lambda m: setattr(m[1], "weight", m[0].bias),
        "a buffer replaced": lambda m: setattr(m[1], "running_mean", torch.randn(32)),
        "a buffer's shape changed in place": lambda m: m[1].num_batches_tracked.resize_(1),
    }
    step = 2
    for what, change in changes.items():
        step += 1
        change(run.model)
        mgr.save(step, comps)
        mgr.flush()
        assert plan.builds == step - 1, what
        model_entry_matches_a_sync_save(run.model, tmp_path / "a" / f"step-{step}", tmp_path)


def test_overlapping_views_are_copied_afresh_at_every_save(tmp_path):
    # two buffers over overlapping bytes of one storage: dedupe stores a clone of one, which a kept plan
    # would copy from forever; such a plan is rebuilt at every save instead
    model = nn.Linear(2, 2)
    base = torch.arange(6.0)
    model.register_buffer("a", base[:4])
    model.register_buffer("b", base[2:])
    mgr = CheckpointManager(tmp_path / "a", async_save=True, keep_last=0)
    for step in (1, 2):
        base.add_(10.0)
        mgr.save(step, {"model": model})
        mgr.flush()
        model_entry_matches_a_sync_save(model, tmp_path / "a" / f"step-{step}", tmp_path)
    assert mgr._background.model_plan.builds == 2


def test_the_manifest_built_in_the_background_is_the_one_of_save_time(tmp_path, monkeypatch):
    slow_commits(monkeypatch, 0.2)
    run = Run()
    meta = {"model": "mlp", "tags": ["first"]}
    mgr = CheckpointManager(tmp_path / "a", async_save=True)
    path = mgr.save(3, run.components(), metadata=meta)
    meta["tags"].append("changed after save returned")
    mgr.flush()
    manifest = checkpoint.inspect(path)["manifest"]
    sync = checkpoint.inspect(CheckpointManager(tmp_path / "s").save(3, run.components(), metadata={
        "model": "mlp", "tags": ["first"]}))["manifest"]
    assert manifest["extra"] == {"tags": ["first"]} and manifest["model"] == "mlp" and manifest["step"] == 3
    for key in ("topology", "dtypes", "num_tensors", "num_elements", "total_bytes", "aliases", "components"):
        assert manifest[key] == sync[key], key
    with pytest.raises(CheckpointError, match="plain JSON"):  # refused at save time, as a sync save does
        mgr.save(4, run.components(), metadata={"args": object()})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned buffers are used for CUDA state only")
def test_cuda_state_is_snapshotted_into_pinned_buffers(tmp_path):
    run = Run()
    run.model.cuda()
    run.opt = torch.optim.AdamW(run.model.parameters(), lr=1e-2)
    run.train_step = Run.train_step.__get__(run)
    run.model(torch.randn(8, 16, device="cuda")).sum().backward()
    run.opt.step()
    mgr = CheckpointManager(tmp_path / "a", async_save=True)
    path = mgr.save(1, run.components())
    mgr.flush()
    pools = mgr._background.model_pool._buffers + mgr._background.state_pool._buffers
    assert pools and all(pinned and b.is_pinned() for b, pinned in pools if b.numel())
    assert_same_tensors(CheckpointManager(tmp_path / "s").save(1, run.components()), path)


def test_at_most_one_save_in_flight_and_entries_land_in_order(tmp_path, monkeypatch):
    log: list = []
    slow_commits(monkeypatch, 0.2, log)
    run = Run()
    mgr = CheckpointManager(tmp_path, async_save=True, keep_last=0)
    returned = []
    for step in (1, 2, 3):
        mgr.save(step, run.components())
        returned.append(time.perf_counter())
        run.train_step()
    mgr.flush()
    assert max(n for kind, _, n, _ in log if kind == "start") == 1  # never two writes at once
    assert [name for kind, name, _, _ in log if kind == "end"] == ["step-1", "step-2", "step-3"]
    ends = {name: t for kind, name, _, t in log if kind == "end"}
    assert returned[1] >= ends["step-1"] and returned[2] >= ends["step-2"]  # each save waited for the previous
    assert returned[0] < ends["step-1"]  # ... and did not wait for its own write
    assert read_pointer(tmp_path / "latest") == "step-3"


def test_latest_moves_only_after_the_entry_is_durable(tmp_path, monkeypatch):
    """The pointer is written after the entry's directory is in place (renamed, fsynced), never before."""
    import checkpoint.policy as policy

    seen = []
    real_write = policy.atomic_write_text

    def spy(path, text):
        if path.name == "latest":
            entry = tmp_path / text.strip()
            seen.append((entry / "manifest.json").is_file() and resume.verifies(entry))
        return real_write(path, text)

    monkeypatch.setattr(policy, "atomic_write_text", spy)
    mgr = CheckpointManager(tmp_path, async_save=True)
    mgr.save(1, Run().components())
    mgr.flush()
    assert seen == [True]


def test_a_failed_background_write_is_reported_and_keeps_the_previous_entry(tmp_path, monkeypatch):
    run = Run()
    mgr = CheckpointManager(tmp_path, async_save=True)
    mgr.save(1, run.components())
    mgr.flush()
    before = {p.name: p.read_bytes() for p in (tmp_path / "step-1").iterdir()}
    import checkpoint.storage as save_module

    real_replace = os.replace

    def full_disk(src, dst):
        if Path(dst).name == "step-2":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)

    monkeypatch.setattr(save_module.os, "replace", full_disk)
    run.train_step()
    mgr.save(2, run.components())  # returns: the failure happens in the background
    assert mgr.wait() is not None
    line = mgr.failure()
    assert line == (f"could not write checkpoint {tmp_path / 'step-2'}: No space left on device; `latest` still "
                    "points to step-1, intact; free disk space or save to a larger disk"), line
    with pytest.raises(CheckpointError) as e:
        mgr.flush()
    assert str(e.value) == line
    assert {p.name: p.read_bytes() for p in (tmp_path / "step-1").iterdir()} == before
    assert read_pointer(tmp_path / "latest") == "step-1" and mgr.latest() == tmp_path / "step-1"
    assert not (tmp_path / "step-2").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".step")]
    mgr.flush()  # told once: the manager is usable again
    monkeypatch.setattr(save_module.os, "replace", real_replace)
    mgr.save(3, run.components())
    mgr.flush()
    assert read_pointer(tmp_path / "latest") == "step-3"


def test_the_next_save_raises_a_failure_not_yet_flushed(tmp_path, monkeypatch):
    run = Run()
    mgr = CheckpointManager(tmp_path, async_save=True)
    monkeypatch.setattr(CheckpointManager, "_commit_entry",
                        lambda self, path, *a, **k: (_ for _ in ()).throw(OSError(errno.EFBIG, "File too large")))
    mgr.save(1, run.components())
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*step-1: File too large; nothing "
                                              r"earlier was changed; raise the file-size limit"):
        mgr.save(2, run.components())
    assert not (tmp_path / "step-2").exists()


def test_async_and_sharded_are_refused_together(tmp_path):
    with pytest.raises(CheckpointError, match="async_save with sharded=True is not supported"):
        CheckpointManager(tmp_path, sharded=True, async_save=True)


def test_a_pending_save_is_flushed_when_the_program_ends(tmp_path):
    """A program that ends right after an async save (no flush) still has that entry durable and `latest`."""
    script = textwrap.dedent(f"""
        import sys, time
        from checkpoint import CheckpointManager
        from test_ckpt_async import Run
        real = CheckpointManager._commit_entry
        def slow(self, *a, **k):
            time.sleep(0.5)
            return real(self, *a, **k)
        CheckpointManager._commit_entry = slow
        mgr = CheckpointManager({str(tmp_path)!r}, async_save=True)
        mgr.save(7, Run().components())
        assert mgr.in_flight()
        print("returned", flush=True)
    """)
    path = os.pathsep.join([str(REPO / "tests"), str(REPO / "bench"), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=child_env(PYTHONPATH=path),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "returned" in proc.stdout, proc.stderr[-3000:]
    resume.VERIFIED.clear()
    assert CheckpointManager(tmp_path).latest() == tmp_path / "step-7"
    assert read_pointer(tmp_path / "latest") == "step-7"


# ------------------------------------------------------------------------------------------ train.py

def _train(args: list[str], *, torchrun: int = 0, preexec=None, timeout: int = 240) -> subprocess.CompletedProcess:
    if not torchrun and preexec is None:
        return train_py(MLP + args, timeout=timeout)
    cmd = [sys.executable, TRAIN]
    if torchrun:
        cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={torchrun}", f"--master_port={free_port()}",
               TRAIN, "--strategy", "ddp"]
    return subprocess.run(cmd + MLP + args, cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=timeout, preexec_fn=preexec)


def _losses(out: Path) -> dict[int, float]:
    import csv

    with open(out / "metrics.csv") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f) if r.get("loss")}


def _train_recording(args: list[str], record: Path) -> subprocess.CompletedProcess:
    """train.py in a child that appends one line to ``record`` per save: 'background' for a save that went
    through the asynchronous path (snapshot, background write), 'sync' for one written before returning."""
    preamble = textwrap.dedent(f"""
        from checkpoint import CheckpointManager
        real_bg, real_sync = CheckpointManager._save_in_background, CheckpointManager._write_entry
        def log(kind):
            with open({str(record)!r}, "a") as f:
                f.write(kind + "\\n")
        def bg(self, *a, **k):
            log("background" + ("+overlap" if self.overlap_snapshot else ""))
            return real_bg(self, *a, **k)
        def sync(self, *a, **k):
            log("sync")
            return real_sync(self, *a, **k)
        CheckpointManager._save_in_background, CheckpointManager._write_entry = bg, sync
    """)
    return train_py(MLP + args, preamble=preamble)


@pytest.mark.timeout(300)
def test_async_save_runs_write_in_the_background_flush_at_exit_and_resume_bit_identically(tmp_path):
    full, record = tmp_path / "full", tmp_path / "saves.txt"
    common = ["--max-steps", "8", "--save-every", "2", "--keep-last", "0"]  # async: the default
    proc = _train_recording(common + ["--output-dir", str(full)], record)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert record.read_text().split() == ["background+overlap"] * 4  # steps 2, 4, 6, 8
    ckpts = full / "checkpoints"
    assert read_pointer(ckpts / "latest") == "step-8"  # the final save (async) was flushed before exit
    assert [s for s, _ in CheckpointManager(ckpts).entries()] == [2, 4, 6, 8]
    assert all(resume.verifies(p) for _, p in CheckpointManager(ckpts).entries())
    part = tmp_path / "part"  # the same run, cut after step-4 was saved
    shutil.copytree(full, part)
    for s in (6, 8):
        shutil.rmtree(part / "checkpoints" / f"step-{s}")
    record.unlink()
    proc = _train_recording(common + ["--resume", "auto", "--output-dir", str(part)], record)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert record.read_text().split() == ["background+overlap"] * 2
    want, got = _losses(full), _losses(part)
    assert [got[s] for s in (5, 6, 7, 8)] == [want[s] for s in (5, 6, 7, 8)]  # bit for bit
    a, b = (checkpoint.load_state_dict(d / "checkpoints" / "step-8") for d in (full, part))
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (tensors(d / "checkpoints" / "step-8" / "state.safetensors") for d in (full, part))
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)  # AdamW moments too
    # --no-async-save: every save is written before training goes on
    record.unlink()
    proc = _train_recording(["--max-steps", "4", "--save-every", "2", "--no-async-save", "--output-dir",
                             str(tmp_path / "sync")], record)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert record.read_text().split() == ["sync"] * 2


FSIZE_LIMIT = 40_000  # bytes: above metrics/config/manifest files, below the MLP's weight and state files


def _limit_file_size() -> None:
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT))


@pytest.mark.timeout(420)
def test_a_failed_background_write_stops_both_ranks_at_the_next_step(tmp_path):
    out = tmp_path / "out"
    proc = _train(["--epochs", "6", "--max-steps", "11", "--async-save", "--output-dir", str(out)], torchrun=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpts = out / "checkpoints"
    before = {p.name: p.read_bytes() for p in (ckpts / "step-11").iterdir()}
    # the save of step 12 fails in the background (EFBIG); the next save, which would flush it, is at step 16
    proc = _train(["--epochs", "6", "--save-every", "4", "--async-save", "--resume", "auto", "--output-dir",
                   str(out)], torchrun=2, preexec=_limit_file_size, timeout=300)
    assert proc.returncode != 0
    workers = proc.stderr.split("torch/distributed/elastic")[0]  # what the ranks printed, before the agent's report
    assert "Traceback" not in workers, proc.stderr[-3000:]
    errors = ["error: " + e.strip() for line in proc.stderr.splitlines() if line.startswith("error: ")
              for e in line.split("error: ") if e.strip()]  # (two ranks' lines may still meet in the pipe)
    # every rank raises the writer's own line; torchrun SIGTERMs the group when the first rank exits, which
    # can cut the other's print short: at least one, and all the same
    want = (f"error: could not write checkpoint {ckpts / 'step-12'}: File too large; `latest` still points to "
            "step-11, intact; raise the file-size limit (ulimit -f) or save elsewhere")
    # ... and a line cut short by that SIGTERM is a beginning of the same line
    assert 1 <= len(errors) <= 2 and want in errors and all(want.startswith(e) for e in errors), proc.stderr[-3000:]
    assert "exitcode  : 2" in proc.stderr or "exitcode: 2" in proc.stderr, proc.stderr[-3000:]
    # stopped at a step boundary from step 12's own (the write can fail within that step's all-reduce) on, not at
    # the next save (step 16, which would flush it too)
    assert 12 <= max(_losses(out)) < 16, max(_losses(out))
    assert {p.name: p.read_bytes() for p in (ckpts / "step-11").iterdir()} == before
    resume.VERIFIED.clear()
    assert read_pointer(ckpts / "latest") == "step-11" and CheckpointManager(ckpts).latest() == ckpts / "step-11"


def test_optimizer_state_renamed_by_itself_equals_torch_helper():
    """OptimizerState builds the name-keyed state itself after torch's helper named the parameters once (the
    helper's cost was most of a snapshot's overhead); the result must be exactly the helper's."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    run = Run()
    state = OptimizerState(run.model, run.opt)
    first, second = state.state_dict(), state.state_dict()
    assert state._names is not None  # the second call took the fast path
    want = get_optimizer_state_dict(run.model, run.opt)
    for got in (first, second):
        assert list(got) == list(want) and got["param_groups"] == want["param_groups"]
        assert list(got["state"]) == list(want["state"])
        assert all(got["state"][k][n] is want["state"][k][n] for k in want["state"] for n in want["state"][k])
    run.opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})  # groups changed: the helper again
    assert state._renamed_state_dict() is None


@pytest.mark.timeout(300)
@pytest.mark.parametrize("save_every", [1, 3])
def test_preemption_with_async_saves_leaves_the_stopping_step_durable(tmp_path, save_every):
    """SIGTERM with --async-save: the checkpoint of the step the ranks stop at is durable and `latest` before
    exit 143, whether it was just saved in the background (flushed) or is saved then (synchronously)."""
    import re
    import signal

    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, TRAIN, *MLP, "--epochs", "50", "--save-every", str(save_every),
                             "--async-save", "--output-dir", str(out)], cwd=REPO, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(_losses(out) if (out / "metrics.csv").is_file() else {}) <= 4:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    m = re.search(r"preempted \(SIGTERM\) at step (\d+): checkpoint (\S+) written", err)
    assert m and "Traceback" not in err, err[-2000:]
    step = int(m.group(1))
    ckpts = out / "checkpoints"
    resume.VERIFIED.clear()
    assert read_pointer(ckpts / "latest") == f"step-{step}" and CheckpointManager(ckpts).latest() == ckpts / f"step-{step}"
