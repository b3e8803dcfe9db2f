"""FSDP2 (fully_shard) with real torchrun + gloo on CPU: canonical save from sharded models, load into sharded
models at another world size (uneven shards), failed writes failing every rank, and train.py runs that move
FSDP x2 -> DDP x3 -> one process -> FSDP x3 with their optimizer state.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint
import models
from conftest import BIN, REPO, child_env, free_port, train_py

pytestmark = pytest.mark.multiproc
WORKER = str(REPO / "tests" / "_fsdp_worker.py")
TRAIN = str(REPO / "scripts" / "train.py")


def torchrun(script: str, *args: object, nproc: int, expect: int = 0, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           script, *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout)
    if expect == 0:
        assert proc.returncode == 0, f"exit {proc.returncode}\nSTDERR:\n{proc.stderr[-4000:]}"
    else:
        assert proc.returncode != 0, proc.stderr[-2000:]
    return proc


BUILD_SINGLE = {  # the worker's models (tests/_fsdp_worker.py BUILD), for one-process loads here
    "mlp": lambda: models.build_model("mlp", in_features=12, hidden=10, num_classes=5),
    "resnet18": lambda: models.build_model("resnet18", num_classes=10, in_channels=1, small_input=True),
}


def assert_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(got[k], want[k]), k


@pytest.mark.timeout(300)
@pytest.mark.parametrize("model", ["mlp", "resnet18"])
def test_save_from_fsdp_x2_is_torchs_full_state_and_loads_into_fsdp_x3(tmp_path, model):
    torchrun(WORKER, "save", model, tmp_path, nproc=2)
    saved = checkpoint.load_state_dict(tmp_path / "model.safetensors")
    assert_exact(saved, torch.load(tmp_path / "ref.pt", weights_only=True))
    manifest = checkpoint.read_manifest(tmp_path / "model.safetensors")
    assert manifest["topology"]["strategy"] == "fsdp" and manifest["topology"]["world_size"] == 2
    assert manifest["topology"]["wrappers"] == ["FSDP"]
    # the manager entry holds the same weights and name-keyed, full (unsharded) AdamW moments
    assert_exact(checkpoint.load_state_dict(tmp_path / "mgr" / "step-1"), saved)
    from checkpoint.states import read_states

    state = read_states(tmp_path / "mgr" / "step-1")["optimizer"]["state"]
    assert {k: v["exp_avg"].shape for k, v in state.items()} == {k: saved[k].shape for k in state}

    torchrun(WORKER, "load", model, tmp_path, nproc=3)  # hidden 10 / 5 classes / 64 channels: uneven at 3
    assert_exact(torch.load(tmp_path / "loaded-w3.pt", weights_only=True), saved)
    report = (tmp_path / "report-w3.txt").read_text()
    assert "loaded into: fsdp x3" in report and "uneven" in report
    # the sharded entries (one file per rank, written by 2) load at world 3, in one process, and convert
    assert_exact(torch.load(tmp_path / "sharded-loaded-w3.pt", weights_only=True), saved)
    entry = tmp_path / "sharded" / "step-2"
    assert sorted(p.name for p in entry.glob("rank-*")) == ["rank-00000-of-00002.safetensors",
                                                             "rank-00001-of-00002.safetensors"]
    assert_exact(checkpoint.load_state_dict(entry, verify=True), saved)
    # its AdamW moments were written by each rank into its own file (never gathered), and come back equal to
    # torch's full gather at world 3 under FSDP, under DDP, and in one process
    from safetensors import safe_open

    for r in (0, 1):
        with safe_open(str(entry / f"rank-{r:05d}-of-00002.safetensors"), "pt") as f:
            assert any(k.startswith("~state/optimizer/state/") and k.endswith("/exp_avg") for k in f.keys()), r
    with safe_open(str(entry / "state.safetensors"), "pt") as f:
        assert not any("exp_avg" in k for k in f.keys())
    ref_optim = torch.load(tmp_path / "ref-optim.pt", weights_only=True)
    assert_optim_exact(torch.load(tmp_path / "sharded-optim-w3.pt", weights_only=True), ref_optim)
    assert_optim_exact(torch.load(tmp_path / "ddp-optim-w3.pt", weights_only=True), ref_optim)
    single = checkpoint.OptimizerState(net := BUILD_SINGLE[model](), torch.optim.AdamW(net.parameters(), lr=0.05))
    checkpoint.CheckpointManager(entry.parent).restore(entry, {"model": net, "optimizer": single})
    assert_optim_exact(single.state_dict(), ref_optim)
    if model == "resnet18":  # BatchNorm: whose statistics were saved
        assert manifest["topology"]["buffers"]["from_rank"] == 0
        assert "buffers (BatchNorm statistics): rank 0's copy" in report
    else:
        # a destination under a regular file: every rank's save raised, for fsdp, ddp and the manager
        for rank in (0, 1):
            failures = json.loads((tmp_path / f"fail.rank{rank}.json").read_text())
            assert all(failures.values()), (rank, failures)
            assert all(str(tmp_path / "a-file") in msg for msg in failures.values())
        assert "rank 0 failed" in json.loads((tmp_path / "fail.rank1.json").read_text())["ddp"]
        sharded_bad_input(tmp_path / "sharded", saved, ref_optim)
        tied_and_dcp(tmp_path, saved)


def tied_and_dcp(root: Path, saved: dict[str, torch.Tensor]) -> None:
    """Tied weights saved from FSDP x2 are stored once (file and sharded entry) and load tied at world 3 and in
    one process; a DCP folder saved by 2 ranks loads into FSDP x3 exactly, each block read from the chunks
    that overlap it only."""
    ref = torch.load(root / "tied-ref.pt", weights_only=True)
    for src, loaded in (("tied.safetensors", "tied.safetensors"), ("tied-sharded/step-1", "tied-sharded")):
        manifest = checkpoint.read_manifest(root / src)
        assert manifest["aliases"] == {"head.weight": "emb.weight"}, src
        assert_exact(torch.load(root / f"tied-loaded-w3-{loaded}.pt", weights_only=True), ref)
        sd = checkpoint.load_state_dict(root / src)
        assert sd["head.weight"] is sd["emb.weight"] and torch.equal(sd["emb.weight"], ref["emb.weight"])
    from safetensors import safe_open

    with safe_open(str(root / "tied.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["body.bias", "body.weight", "emb.weight"]
    for r in (0, 1):
        with safe_open(str(root / "tied-sharded" / "step-1" / f"rank-{r:05d}-of-00002.safetensors"), "pt") as f:
            assert "head.weight" not in f.keys() and "emb.weight" in f.keys()
    assert_exact(torch.load(root / "dcp-loaded-w3.pt", weights_only=True), saved)
    # rows 5..9 of the 10-row hidden layer are rank 1's chunk at world 2: read straight from that chunk's bytes
    # in its .distcp file (DCP's reader not asked); with that path off, DCP is asked for that chunk only
    import checkpoint.dcp as stream
    from checkpoint.readers import read_source
    from torch.distributed.checkpoint import FileSystemReader

    real, real_offset = FileSystemReader.read_data, stream.chunk_data_offset
    for direct in (True, False):
        asked: list = []
        FileSystemReader.read_data = lambda self, plan, planner: (asked.extend(plan.items), real(self, plan, planner))[1]
        if not direct:
            stream.chunk_data_offset = lambda *a, **k: None
        try:
            src = read_source(root / "dcp")
            block = torch.empty(5, 12)
            src.tensors["1.weight"].read_block(block, (5, 12), (5, 0))
        finally:
            FileSystemReader.read_data, stream.chunk_data_offset = real, real_offset
        assert torch.equal(block, saved["1.weight"][5:])
        if direct:
            assert asked == []
        else:
            assert len(asked) == 1 and list(asked[0].storage_offsets) == [0, 0] and list(asked[0].lengths) == [5, 12]


def assert_optim_exact(got: dict, want: dict) -> None:
    """Name-keyed optimizer states equal bit for bit (every moment and step), param groups alike."""
    assert sorted(got["state"]) == sorted(want["state"])
    for name, entry in want["state"].items():
        assert sorted(got["state"][name]) == sorted(entry), name
        for k, v in entry.items():
            assert torch.equal(torch.as_tensor(got["state"][name][k]), torch.as_tensor(v)), (name, k)
    assert [sorted(g["params"]) for g in got["param_groups"]] == [sorted(g["params"]) for g in want["param_groups"]]


def sharded_bad_input(root: Path, saved: dict[str, torch.Tensor], ref_optim: dict) -> None:
    entry = root / "step-2"
    cli = [sys.executable, "-m", "checkpoint"]
    conv = subprocess.run([*cli, "convert", str(entry), str(root / "one.safetensors")], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert conv.returncode == 0, conv.stderr
    assert_exact(checkpoint.load_state_dict(root / "one.safetensors"), saved)
    # to a directory the entry stays one: the rank files' optimizer moments are written whole into its state
    conv = subprocess.run([*cli, "convert", str(entry), str(root.parent / "whole")], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert conv.returncode == 0, conv.stderr
    from checkpoint.states import read_states

    assert_optim_exact(read_states(root.parent / "whole")["optimizer"], ref_optim)
    # a corrupted rank file (same size): latest() falls back to the previous entry; load with verify names it
    rank1 = entry / "rank-00001-of-00002.safetensors"
    data = bytearray(rank1.read_bytes())
    data[-1] ^= 0xFF
    rank1.write_bytes(bytes(data))
    assert checkpoint.CheckpointManager(root).latest() == root / "step-1"
    with pytest.raises(checkpoint.CheckpointError, match="rank-00001-of-00002.safetensors: sha256"):
        checkpoint.load_state_dict(entry, verify=True)
    rank1.unlink()
    with pytest.raises(checkpoint.CheckpointError, match="rank-00001-of-00002.safetensors"):
        checkpoint.load_state_dict(entry)
    # mixed world sizes in one entry: refused
    other = root / "step-1"
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["sharded"]["world_size"] = 3
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(checkpoint.CheckpointError, match="mixes world sizes"):
        checkpoint.load_state_dict(other)


# ------------------------------------------------------------------------------------- train.py

MLP = ["--model", "mlp", "--data", "digits", "--num-samples", "400", "--batch-size", "24", "--lr", "0.01",
       "--warmup-steps", "2", "--max-steps", "8", "--save-every", "2", "--keep-last", "0", "--log-every", "1",
       "--no-progress", "--no-tensorboard"]


def train(kind: str, out: Path, *extra: str, nproc: int = 1, expect: int = 0) -> subprocess.CompletedProcess:
    args = [*MLP, "--output-dir", str(out), *extra]
    if kind == "python":
        proc = train_py(args)
        assert proc.returncode == expect, proc.stderr[-4000:]
        return proc
    if kind == "accelerate":  # accelerate launch on CPU, the strategy given to train.py as for torchrun
        cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(nproc), "--num_machines",
               "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), TRAIN]
        proc = subprocess.run([*cmd, *args], cwd=REPO, env=child_env(ACCELERATE_USE_CPU="1"), capture_output=True,
                              text=True, timeout=240)
        assert proc.returncode == expect, proc.stderr[-4000:]
        return proc
    return torchrun(TRAIN, *args, "--strategy", kind, nproc=nproc, expect=expect)


def each_rank(args: list[str], world: int, timeout: int = 240) -> list[subprocess.CompletedProcess]:
    """Start the ranks ourselves, with the environment torchrun gives them: torchrun stops the other ranks
    as soon as one exits, so only this shows every rank's own exit code and error line."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = child_env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                        GROUP_RANK="0", GROUP_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, TRAIN, *MLP, *args], cwd=REPO, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def assert_one_line_error_on_every_rank(procs: list[subprocess.CompletedProcess], *needles: str) -> list[str]:
    lines = []
    for rank, p in enumerate(procs):
        errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
        assert p.returncode == 2 and len(errors) == 1, (rank, p.returncode, p.stderr[-3000:])
        assert "Traceback" not in p.stderr, p.stderr[-3000:]
        lines.append(errors[0])
    for needle in needles:
        assert any(needle in line for line in lines), (needle, lines)
    return lines


def losses(out: Path) -> dict[int, float]:
    with open(out / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f) if r["loss"]}


@pytest.mark.timeout(420)
def test_train_fsdp_x2_resumes_under_ddp_x3_single_and_fsdp_x3_on_the_same_losses(tmp_path):
    """A run moves FSDP x2 (accelerate launch) -> DDP x3 -> one process -> FSDP x3, two steps each; every step's loss matches
    the uninterrupted single-process run (the MLP has no batch statistics; AdamW moments carry over)."""
    train("python", tmp_path / "straight")
    straight = losses(tmp_path / "straight")
    assert sorted(straight) == list(range(1, 9))
    a, b, c, d = (tmp_path / n for n in "abcd")
    # FSDP under accelerate launch (CPU), one file per rank; read back by ddp x3 below
    proc = train("accelerate", a, "--strategy", "fsdp", "--save-sharded", nproc=2)
    assert "--save-sharded: checkpoints are written synchronously" in proc.stderr  # async is the default elsewhere
    assert checkpoint.read_manifest(a / "checkpoints" / "step-2")["topology"]["strategy"] == "fsdp"
    assert checkpoint.read_manifest(a / "checkpoints" / "step-2")["topology"]["launcher"] == "accelerate"
    assert checkpoint.read_manifest(a / "checkpoints" / "step-2")["sharded"]["world_size"] == 2
    train("ddp", b, "--resume", str(a / "checkpoints" / "step-2"), nproc=3)
    train("python", c, "--resume", str(b / "checkpoints" / "step-4"))
    train("fsdp", d, "--resume", str(c / "checkpoints" / "step-6"), nproc=3)
    for run, steps in ((a, range(1, 9)), (b, range(3, 9)), (c, range(5, 9)), (d, range(7, 9))):
        got = losses(run)
        assert sorted(got) == list(steps), run.name
        for s in steps:
            assert got[s] == pytest.approx(straight[s], rel=1e-5), (run.name, s, got[s], straight[s])
    # without the optimizer state the resumed losses would drift: check the test can tell
    assert losses(d)[8] != pytest.approx(losses(a)[2], rel=1e-3)

    # bad input on every rank: a checkpoint whose shapes do not fit the sharded model
    procs = each_rank(["--strategy", "fsdp", "--output-dir", str(tmp_path / "bad"), "--eval-only", "--resume",
                       str(d / "checkpoints" / "step-8"), "--model-arg", "hidden=32"], world=2)
    lines = assert_one_line_error_on_every_rank(procs, "does not fit")
    assert all("does not fit" in line for line in lines)


@pytest.mark.timeout(240)
def test_a_save_that_cannot_be_written_fails_every_rank_with_exit_2(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("a regular file where the checkpoint directory should be")
    procs = each_rank(["--strategy", "fsdp", "--output-dir", str(out), "--max-steps", "2"], world=2)
    lines = assert_one_line_error_on_every_rank(procs, "could not write checkpoint", "File exists")
    # saves are asynchronous by default: the writer's own line, told to every rank (a synchronous save's
    # failure reaches the other ranks as "rank 0 failed: ...")
    assert lines[0] == lines[1], lines
    assert (out / "checkpoints").read_text().startswith("a regular file")


@pytest.mark.timeout(400)
def test_unet_fsdp_bf16_trains_saves_float32_says_whose_bn_buffers_and_loads_at_world_3(tmp_path):
    """U-Net (BatchNorm) under --strategy fsdp --amp bf16 at world 2: it trains, its entry is float32 canonical
    (MixedPrecisionPolicy computes in bf16, the sharded weights stay float32), the manifest says the ranks' BN
    statistics differed at the mid-epoch save and that rank 0's were kept, and the entry loads into FSDP x3
    equal to torch's get_model_state_dict(full)."""
    out = tmp_path / "unet"
    proc = torchrun(TRAIN, "--strategy", "fsdp", "--amp", "bf16", "--model", "unet", "--model-arg", "base_width=4",
                    "--data", "shapes:48", "--image-size", "16", "--batch-size", "8", "--max-steps", "3",
                    "--save-every", "2", "--keep-last", "0", "--log-every", "1", "--no-progress", "--no-tensorboard",
                    "--output-dir", str(out), nproc=2)
    assert "fsdp" in proc.stderr + proc.stdout
    got = losses(out)
    assert sorted(got) == [1, 2, 3] and all(v == v and 0 < v < 100 for v in got.values()), got
    entry = out / "checkpoints" / "step-2"
    manifest = checkpoint.read_manifest(entry)
    assert manifest["topology"]["strategy"] == "fsdp" and manifest["dtypes"].keys() <= {"float32", "int64"}
    # each rank normalised its own half of the batch: the replicas differed, rank 0's copy is the saved one
    assert manifest["topology"]["buffers"] == {"from_rank": 0, "identical_on_all_ranks": False, "world_size": 2}
    saved = checkpoint.load_state_dict(entry)
    assert all(v.dtype in (torch.float32, torch.int64) for v in saved.values())
    torchrun(WORKER, "load-entry", entry, tmp_path, nproc=3)
    assert_exact(torch.load(tmp_path / "entry-loaded-w3.pt", weights_only=True), saved)
    report = (tmp_path / "entry-report-w3.txt").read_text()
    assert "ranks differed; kept rank 0 of 2 ranks" in report and "loaded into: fsdp x3" in report


def test_a_sharded_entry_asked_for_ema_refuses_in_one_line(tmp_path):
    net = models.build_model("mlp", in_features=12, hidden=10, num_classes=5)
    entry = checkpoint.CheckpointManager(tmp_path, sharded=True).save(1, {"model": net})
    assert checkpoint.load(entry, net).loaded == len(net.state_dict())
    for call in (lambda: checkpoint.load(entry, net, ema=True), lambda: checkpoint.load_state_dict(entry, ema=True)):
        with pytest.raises(checkpoint.CheckpointError, match="no EMA weights.*drop ema / --ema"):
            call()


def _st_parts(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's tensor table (without __metadata__, whose "created" may differ) and its data bytes."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    return header, raw[8 + n:]


@pytest.mark.timeout(240)
def test_every_rank_writes_its_rows_into_the_one_file_streams_when_it_cannot_and_any_failure_fails_all(tmp_path):
    """World 3, uneven shards (10 rows: 4/4/2; 5 rows: 2/2/1): the canonical file written by every rank in
    parallel is torch's full state and byte for byte the file streamed to rank 0 when a rank cannot open it;
    a rank whose own write fails makes every rank raise and leaves no file; a sharded entry's sha256, computed
    while writing, is the sha256 of each file on disk."""
    from checkpoint.storage import sha256_file

    torchrun(str(REPO / "tests" / "_fsdp_parallel_worker.py"), tmp_path, nproc=3)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    ref = torch.load(tmp_path / "ref.pt", weights_only=True)
    assert [r["errors"]["parallel"] for r in ranks] == [None] * 3
    assert_exact(checkpoint.load_state_dict(tmp_path / "parallel.safetensors"), ref)
    assert all(r["pwrites"]["parallel"] > 0 for r in ranks)  # each rank wrote its own rows: nothing streamed
    # rank 1 could not open the file: streamed to rank 0 (no rank wrote rows itself), same bytes
    assert [r["errors"]["streamed"] for r in ranks] == [None] * 3
    assert [r["pwrites"]["streamed"] for r in ranks] == [0, 0, 0]
    assert _st_parts(tmp_path / "streamed.safetensors") == _st_parts(tmp_path / "parallel.safetensors")
    # rank 2's disk full: every rank raised, naming rank 2's error; no file, no temporary left behind
    errors = [r["errors"]["failed"] for r in ranks]
    assert all(e and "rank 2 could not write its part" in e and "No space left" in e for e in errors), errors
    assert not (tmp_path / "failed.safetensors").exists()
    assert not list(tmp_path.glob(".failed.safetensors*"))
    # sharded entry: hashes computed while writing equal the files' sha256 on disk
    entry = tmp_path / "sharded" / "step-1"
    files = json.loads((entry / "manifest.json").read_text())["files"]
    assert len([n for n in files if n.startswith("rank-")]) == 3
    assert all(meta["sha256"] == sha256_file(entry / name) for name, meta in files.items())
