"""Checkpoints on an object store (checkpoint/objstore.py), against a real S3 server (SeaweedFS, bench/_s3.py):
entries uploaded and committed by their manifest, put last and create-only; latest and best from committed
entries; loads by byte ranges; the CLI on URLs; bad credentials, bucket and endpoint; faults.

Nothing here mocks S3: the server is started and stopped by the fixture.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import checkpoint
import checkpoint.safetensors_io
from checkpoint import objstore
from checkpoint.objstore import S3Path
from conftest import BIN, REPO, child_env, train_py

import _s3

pytestmark = pytest.mark.multiproc  # a server process per module


@pytest.fixture(scope="module")
def s3():
    why = _s3.unavailable()
    if why:  # make install installs it (the test extra): missing is a failure, not a skip
        pytest.fail(why)
    with _s3.s3_server() as server:
        saved = {k: os.environ.get(k) for k in server.env}
        os.environ.update(server.env)
        try:
            yield server
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def trained(seed: int = 0):
    m = small_model(seed)
    opt = torch.optim.AdamW(m.parameters(), lr=0.01)
    m(torch.randn(8, 16)).sum().backward()
    opt.step()
    return m, opt


def keys_under(url: str) -> list[str]:
    p = S3Path.from_url(url)
    return sorted(m["path"][len(p.key) + 1:] for m in p.walk_objects())


# ------------------------------------------------------------------------------------------ paths


def test_object_paths_behave_like_paths_and_refuse_to_leave_their_prefix():
    p = S3Path.from_url("s3://bucket/run/checkpoints")
    assert str(p / "step-10" / "manifest.json") == "s3://bucket/run/checkpoints/step-10/manifest.json"
    assert (p / "step-10").name == "step-10" and (p / "step-10").parent == p and (p / "a.safetensors").suffix == ".safetensors"
    for bad in ("../secret.safetensors", "/etc/passwd", "a/../../b"):
        with pytest.raises(checkpoint.CheckpointError):
            p / bad
    assert objstore.as_path("s3://b/k") == S3Path("b", "k") and not hasattr(S3Path("b", "k"), "__fspath__")


def test_a_shard_index_or_manifest_naming_files_outside_its_folder_is_refused(tmp_path):
    """Local paths too: an HF index whose weight_map names ../secret.safetensors or /etc/passwd."""
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, tmp_path / "secret.safetensors")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for target in ("../secret.safetensors", "/etc/passwd"):
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": target}}))
        with pytest.raises(checkpoint.CheckpointError, match="not a file inside the checkpoint's folder"):
            checkpoint.load_state_dict(folder)
        done = subprocess.run([str(BIN / "anytopo-ckpt"), "inspect", str(folder)], capture_output=True, text=True,
                              timeout=120, env=child_env())
        assert done.returncode == 2 and "not a file inside the checkpoint's folder" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


# --------------------------------------------------------------------------------------- the manager

@pytest.mark.timeout(120)
def test_entries_commit_by_their_manifest_and_latest_is_the_newest_committed(s3):
    url = s3.url("mgr/checkpoints")
    m, opt = trained()
    mgr = checkpoint.CheckpointManager(url, keep_last=2)
    for step in (10, 20, 30):
        assert str(mgr.save(step, {"model": m, "optimizer": checkpoint.OptimizerState(m, opt),
                                   "trainer": {"step": step}})) == f"{url}/step-{step}"
    # pruned to the newest two; no pointer object: latest is read from the committed entries
    assert [s for s, _ in mgr.entries()] == [20, 30]
    assert keys_under(url) == sorted(f"step-{s}/{n}" for s in (20, 30)
                                     for n in ("manifest.json", "model.safetensors", "state.json", "state.safetensors"))
    # a save that uploaded its data but never committed (a crash before the manifest) is invisible
    S3Path.from_url(f"{url}/step-40/model.safetensors").put_bytes(b"partial")
    assert mgr.latest() == S3Path.from_url(f"{url}/step-30")
    fresh, opt2 = trained(seed=1)
    restored = mgr.restore(None, {"model": fresh, "optimizer": checkpoint.OptimizerState(fresh, opt2),
                                  "trainer": {}})
    assert restored.step == 30 and restored.states["trainer"] == {"step": 30}
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), fresh.state_dict().values()))
    assert opt2.state_dict()["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])
    # best: a pointer written after its entry's commit, so never ahead of the data; protected from pruning
    assert mgr.update_best(30, "accuracy", 0.9) and mgr.best() == S3Path.from_url(f"{url}/step-30")
    # pruning after the next commit removes the uncommitted leftovers older than it
    mgr.save(50, {"model": m})
    assert not any(k.startswith("step-40/") for k in keys_under(url))
    mgr.save(60, {"model": m})
    assert [s for s, _ in mgr.entries()] == [30, 50, 60]


@pytest.mark.timeout(120)
def test_re_saving_a_step_replaces_it_and_a_second_writer_of_one_entry_is_refused(s3):
    url = s3.url("twice/checkpoints")
    a, b = small_model(1), small_model(2)
    mgr = checkpoint.CheckpointManager(url, keep_last=0)
    mgr.save(5, {"model": a})
    mgr.save(5, {"model": b})
    assert torch.equal(checkpoint.load_state_dict(f"{url}/step-5")["0.weight"], b[0].weight)
    # the commit is create-only: a writer that finds the manifest already there stops with one line
    manifest = S3Path.from_url(f"{url}/step-5/manifest.json")
    with pytest.raises(checkpoint.CheckpointError, match="committed by another writer meanwhile"):
        manifest.put_bytes(manifest.read_bytes(), create_only=True)


@pytest.mark.timeout(120)
def test_loads_read_byte_ranges_into_the_model_and_check_every_sha256(s3, tmp_path, monkeypatch):
    m = small_model(3)
    url = s3.url("load/checkpoints")
    checkpoint.CheckpointManager(url).save(1, {"model": m})
    from safetensors.torch import save_file

    save_file(m.state_dict(), tmp_path / "w.safetensors")
    S3Path.from_url(s3.url("plain/w.safetensors")).upload(tmp_path / "w.safetensors")
    # small runs and batches: the read goes through several batches of ranged GETs, each copied into place
    monkeypatch.setattr(objstore, "READ_BATCH", 256)
    monkeypatch.setattr(checkpoint.safetensors_io, "READ_RUN", 128)
    staging = tmp_path / "tmp"
    staging.mkdir()
    monkeypatch.setenv("TMPDIR", str(staging))
    target = small_model(4)
    report = checkpoint.load(f"{url}/step-1", target, verify=True)
    assert all(torch.equal(x, y) for x, y in zip(m.state_dict().values(), target.state_dict().values()))
    assert any("sha256 verified" in c for c in report.checks)
    assert list(staging.iterdir()) == []  # nothing downloaded to disk (the header stand-in is gone too)
    assert checkpoint.load_state_dict(url).keys() == m.state_dict().keys()  # a checkpoint-dir URL: its newest entry
    # a plain safetensors object, read by URL like a file
    assert torch.equal(checkpoint.load_state_dict(s3.url("plain/w.safetensors"))["2.bias"], m[2].bias)


@pytest.mark.timeout(180)
def test_the_cli_reads_urls_and_verify_refuses_an_entry_whose_objects_are_gone(s3, tmp_path):
    m = small_model(5)
    url = s3.url("cli/checkpoints")
    checkpoint.CheckpointManager(url).save(7, {"model": m}, metadata={"model": "mlp"})
    entry = f"{url}/step-7"
    env = child_env(**s3.env)

    def ckpt(*args):
        return subprocess.run([str(BIN / "anytopo-ckpt"), *args], capture_output=True, text=True, timeout=120,
                              env=env, cwd=REPO)

    shown = ckpt("inspect", entry, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["format"] == "anytopo-safetensors"
    out = tmp_path / "copy.safetensors"
    done = ckpt("convert", entry, str(out))
    assert done.returncode == 0, done.stderr
    assert ckpt("diff", entry, str(out)).returncode == 0
    S3Path.from_url(f"{entry}/model.safetensors").unlink()
    for command in ("inspect", "verify"):
        gone = ckpt(command, entry)
        assert gone.returncode == 2 and f"{entry}/model.safetensors" in gone.stderr, gone.stderr
        assert "Traceback" not in gone.stderr


# ------------------------------------------------------------------------------------------ training

MLP = ["--model", "mlp", "--data", "digits", "--num-samples", "200", "--batch-size", "32", "--epochs", "2",
       "--save-every", "3", "--no-progress", "--no-tensorboard"]


@pytest.mark.timeout(240)
def test_train_saves_to_the_store_and_resumes_from_it(s3, tmp_path):
    """--checkpoint-dir s3://...: the run's logs stay local, its entries go to the store (async saves, the
    default), summary.json names the entry's URL; a second run --resume auto continues it from the store."""
    url = s3.url("train/ckpt")
    first = train_py([*MLP, "--output-dir", str(tmp_path / "a"), "--checkpoint-dir", url], **s3.env)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["checkpoint"] == f"{url}/step-{summary['steps']}"
    assert not (tmp_path / "a" / "checkpoints").exists()
    more = [a if a != "2" else "4" for a in MLP]  # --epochs 4
    second = train_py([*more, "--output-dir", str(tmp_path / "b"), "--checkpoint-dir", url, "--resume", "auto"],
                      **s3.env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resumed from {url}/step-{summary['steps']}" in second.stderr
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["steps"] == 2 * summary["steps"]


@pytest.mark.timeout(240)
def test_every_rank_uploads_its_own_rank_file_and_one_process_resumes_the_sharded_entry(s3, tmp_path):
    """torchrun x2, FSDP with --save-sharded to the store: each entry holds both ranks' files (each uploaded by
    its rank) under a manifest that lists them with their sha256; one process then resumes it by URL."""
    url = s3.url("sharded/ckpt")
    args = ["--model", "mlp", "--data", "digits", "--num-samples", "200", "--batch-size", "32", "--max-steps", "6",
            "--save-every", "3", "--no-progress", "--no-tensorboard"]
    done = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", str(REPO / "scripts" / "train.py"),
                           *args, "--strategy", "fsdp", "--save-sharded", "--output-dir", str(tmp_path / "a"),
                           "--checkpoint-dir", url], env=child_env(**s3.env), capture_output=True, text=True,
                          timeout=200, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    entry = checkpoint.CheckpointManager(url).latest()
    manifest = json.loads((entry / "manifest.json").read_text())
    ranks = manifest["sharded"]["files"]
    assert len(ranks) == 2 and all(name in manifest["files"] for name in ranks)
    assert set(ranks) <= {p.name for p in entry.iterdir()}
    resumed = train_py([*args, "--max-steps", "9", "--output-dir", str(tmp_path / "b"), "--checkpoint-dir", url,
                        "--resume", "auto"], **s3.env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {entry}" in resumed.stderr and "(world 2)" in resumed.stderr, resumed.stderr[-3000:]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", ["credentials", "bucket", "endpoint"])
def test_bad_credentials_bucket_or_endpoint_exit_2_in_seconds_with_the_fix(s3, tmp_path, fault):
    env = dict(s3.env)
    url = s3.url("bad")
    if fault == "credentials":
        env["AWS_SECRET_ACCESS_KEY"] = "wrong"
        want = "refused the credentials"
    elif fault == "bucket":
        url = "s3://no-such-bucket/run"
        want = "bucket 'no-such-bucket' does not exist"
    else:
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{_s3.free_port()}"
        want = "did not answer"
    start = time.monotonic()
    done = train_py([*MLP, "--output-dir", str(tmp_path / "o"), "--checkpoint-dir", url], **env)
    took = time.monotonic() - start
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and want in lines[0] and "--checkpoint-dir" in lines[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert took < 60  # bounded: a short check before training, not the save-time retry budget


@pytest.mark.timeout(240)
def test_the_server_killed_mid_run_fails_the_save_with_one_line_and_keeps_the_committed_entry(s3, tmp_path):
    """The store goes away after the first entry: the next save fails on the rank after its retries
    (ANYTOPO_S3_RETRY_S=10 here) with one line naming the URL; restarted, the store still has the first
    entry, committed and whole, as the latest."""
    url = s3.url("killed/ckpt")
    args = [*MLP, "--epochs", "30", "--save-every", "5", "--output-dir", str(tmp_path / "o"), "--checkpoint-dir", url]
    # the run stops the server itself right after its first committed save (a hook on the manager's commit)
    preamble = f"""
import os, signal, checkpoint.manager as m
_after = m.CheckpointManager._after_commit
def after(self, step):
    _after(self, step)
    if step == 5:
        os.killpg({s3.proc.pid}, signal.SIGKILL)
m.CheckpointManager._after_commit = after
"""
    try:
        done = train_py(args, preamble=preamble, **s3.env)
    finally:
        s3.proc.wait(10)
        s3.start()
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and url in errors[0] and "did not answer" in errors[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    mgr = checkpoint.CheckpointManager(url)
    assert [s for s, _ in mgr.entries()] == [5] and mgr.latest() == S3Path.from_url(f"{url}/step-5")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("trials", [pytest.param(5, id="5"),
                                    pytest.param(60, id="60", marks=pytest.mark.slow)])  # ~2-3 min: make test-slow
def test_a_writer_sigkilled_at_random_points_of_its_uploads_never_leaves_a_commit_without_its_data(s3, trials):
    """tests/_s3_kill.py: after every SIGKILL, every committed entry verifies and loads the weights saved at its
    step, and latest is the newest of them; the kills landed mostly mid-upload."""
    url = s3.url(f"kill-{trials}/ckpt")
    done = subprocess.run([sys.executable, str(REPO / "tests" / "_s3_kill.py"), url, str(trials), "0"],
                          capture_output=True, text=True, timeout=560, env=child_env(**s3.env, PYTHONPATH=str(REPO)))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["bad"] == [] and result["checks"] == trials + 1, result
    assert result["kills_landed_in"].get("upload", 0) >= trials // 4, result
    assert result["final_steps"], result  # entries did commit between the kills


# ------------------------------------------------------------------------------ no shared filesystem

SHARDED = ["--model", "mlp", "--data", "digits", "--num-samples", "400", "--batch-size", "32", "--epochs", "100",
           "--max-steps", "300", "--save-every", "4", "--lr", "0.01", "--warmup-steps", "1", "--no-progress", "--no-tensorboard",
           "--log-every", "1"]


@pytest.mark.slow  # three runs, two of them on two hosts (~1 min): make test-slow
@pytest.mark.timeout(400)
def test_two_hosts_without_a_shared_disk_save_to_the_store_lose_a_node_and_resume_on_one(tmp_path):
    """Two network namespaces, each node with its own local --output-dir, FSDP over both with --save-sharded:
    every rank uploads its own rank file, rank 0 commits. Node b is killed after the step-4 entry committed;
    node a's rank ends with its one line; then node a alone (one process, no FSDP) resumes from the store and
    trains to step 300 (the same schedule): its weights equal an uninterrupted one-process run's within float rounding (1e-5
    relative; the first steps ran at world 2)."""
    from _netns import two_hosts
    from _netns import unavailable as netns_unavailable

    why = netns_unavailable() or _s3.unavailable()
    if why:
        pytest.fail(why)
    ref_out = tmp_path / "ref"
    ref = train_py([*SHARDED, "--output-dir", str(ref_out)])
    assert ref.returncode == 0, ref.stderr[-3000:]
    with two_hosts() as (a, b), _s3.s3_server(ip=a.addr, netns=a.ns) as store:
        url = store.url("nodes/ckpt")
        env = child_env(**store.env, PYTHONPATH=str(REPO))

        def in_a(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
            return subprocess.run(a.cmd(list(argv)), capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)

        def committed() -> int:
            """The step of the newest committed entry (0 for none)."""
            shown = in_a(str(BIN / "anytopo-ckpt"), "inspect", url, "--json")
            return (json.loads(shown.stdout).get("manifest") or {}).get("step", 0) if shown.returncode == 0 else 0

        port = free_port_in_ns()
        nodes = [h.cmd([sys.executable, "-m", "launcher", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank",
                        str(r), "--master", f"{a.addr}:{port}", "--ifname", h.ifname, "--join-timeout", "60",
                        str(REPO / "scripts" / "train.py"), *SHARDED, "--strategy", "fsdp", "--save-sharded",
                        "--output-dir", str(tmp_path / f"node-{r}"), "--checkpoint-dir", url])
                 for r, h in enumerate((a, b))]
        procs = [subprocess.Popen(n, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True) for n in nodes]
        try:
            deadline = time.monotonic() + 120
            while not committed():
                assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                    [p.poll() for p in procs]
                time.sleep(0.5)
            for pid in subprocess.run(["ip", "netns", "pids", b.ns], capture_output=True, text=True).stdout.split():
                os.kill(int(pid), 9)  # node b is gone: every process in its namespace (torchrun's workers too)
            out_a = procs[0].communicate(timeout=120)[0]
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, 9)
                p.wait()
        assert procs[0].returncode != 0
        assert any(ln.startswith("error: rank 0/2 on ") and "went away during a collective" in ln
                   for ln in out_a.splitlines()), out_a[-3000:]
        assert not (tmp_path / "node-0" / "checkpoints").exists() and not (tmp_path / "node-1" / "checkpoints").exists()
        # node a alone, from the store: a different topology (one process) and its own fresh output dir
        resumed = in_a(sys.executable, str(REPO / "scripts" / "train.py"), *SHARDED,
                       "--output-dir", str(tmp_path / "alone"), "--checkpoint-dir", url, "--resume", "auto",
                       timeout=240)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        step = re.search(r"resumed from \S+/step-(\d+)", resumed.stderr)
        assert step and 4 <= int(step.group(1)) < 300, resumed.stderr[-3000:]
        got = json.loads(in_a(sys.executable, "-c", "import checkpoint, json, sys; sd = checkpoint.load_state_dict("
                              f"{url + '/step-300'!r}); print(json.dumps({{k: v.double().flatten().tolist() for k, v in "
                              "sd.items()}))", timeout=120).stdout)
    want = checkpoint.load_state_dict(ref_out / "checkpoints" / "step-300")
    assert got.keys() == want.keys()
    for k, w in want.items():
        g = torch.tensor(got[k], dtype=torch.float64)
        assert float((g - w.double().flatten()).norm() / max(w.double().norm(), 1e-12)) <= 1e-5, k


def free_port_in_ns() -> int:
    """A port number for a listener inside a fresh namespace (nothing else listens there)."""
    return 29400 + os.getpid() % 1000
