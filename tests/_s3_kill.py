"""SIGKILL a checkpoint writer at random points of its uploads to an object store, many times; after each kill,
check what the store holds. Run by tests/test_objstore.py: ``python tests/_s3_kill.py URL TRIALS SEED``, with
the AWS_* variables of a running server; prints one JSON object.

One process runs every trial without importing torch again: it forks a writer (this parent never touches the
object store: obstore's runtime does not survive a fork), lets it save entries ``step-N`` of a ~24 MB model
(weights a function of N, two multipart parts and a state file each, keep_last=3 so pruning runs too) for a
random 0-1.5 s after its check, and SIGKILLs it. The next writer first checks the store as a resuming run would see it:
every committed entry verifies (every file present with its sha256: no commit without its data) and loads the
very weights saved at its step (never a torn load), ``latest`` is the newest of them; then it saves on from
there. The writer logs the phase it is in (writing locally, uploading, committing, pruning), so the result says
where the kills landed.
"""
from __future__ import annotations

import json
import os
import random
import signal
import sys
import time

import torch
from torch import nn

import checkpoint
from checkpoint import objstore, policy


def model_for(step: int) -> nn.Module:
    torch.manual_seed(step)
    return nn.Sequential(nn.Linear(1024, 3072), nn.Linear(3072, 1024))  # 6.3M float32: ~24 MB


def check(url: str) -> dict:
    """What a resuming run would find: committed entries, all whole, each the weights of its step."""
    mgr = checkpoint.CheckpointManager(url, keep_last=3)
    entries = mgr.entries()
    bad = []
    for step, path in entries:
        if not checkpoint.resume.verifies(path):
            bad.append(f"{path.name}: does not verify")
            continue
        got = checkpoint.load_state_dict(path)
        want = model_for(step).state_dict()
        if got.keys() != want.keys() or not all(torch.equal(got[k], want[k]) for k in want):
            bad.append(f"{path.name}: weights differ from step {step}'s")
    latest = mgr.latest()
    newest = entries[-1][1] if entries else None
    if latest != newest:
        bad.append(f"latest {latest} is not the newest committed entry {newest}")
    return {"steps": [s for s, _ in entries], "bad": bad}


def writer(url: str, log_path: str) -> None:
    log = open(log_path, "a", buffering=1)

    def phase(name: str, step: int) -> None:
        log.write(f"{name} {step}\n")

    result = check(url)
    log.write("check " + json.dumps(result) + "\n")
    real_publish, real_prune = objstore.publish_directory, policy.prune

    def publish(local, dst, *, commit_name):
        phase("upload", int(dst.name.split("-")[1]))
        real_publish(local, dst, commit_name=commit_name)

    def prune(directory, keep_last, protect):
        phase("prune", protect)
        real_prune(directory, keep_last, protect)

    checkpoint.entry.publish_directory = publish  # the names the writer calls them by
    checkpoint.manager.policy.prune = prune
    mgr = checkpoint.CheckpointManager(url, keep_last=3)
    step = (result["steps"][-1] if result["steps"] else 0) + 1
    while True:
        phase("write", step)
        mgr.save(step, {"model": model_for(step), "trainer": {"step": step}})
        phase("done", step)
        step += 1


def main(url: str, trials: int, seed: int) -> int:
    import checkpoint.entry  # noqa: F401 -- imported before the forks, so each writer starts warm
    import checkpoint.manager  # noqa: F401
    import checkpoint.resume  # noqa: F401

    rng = random.Random(seed)
    log_path = f"{os.environ.get('TMPDIR', '/tmp')}/anytopo-kill-{os.getpid()}.log"
    landed: dict[str, int] = {}
    checks = []
    try:
        for _ in range(trials):
            open(log_path, "w").close()
            pid = os.fork()
            if pid == 0:
                try:
                    writer(url, log_path)
                finally:
                    os._exit(1)
            deadline = time.monotonic() + 60
            while "write " not in open(log_path).read() and time.monotonic() < deadline:
                time.sleep(0.005)  # the check is done: the writer saves from here
            time.sleep(rng.uniform(0.0, 1.5))
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            lines = open(log_path).read().splitlines()
            checks += [json.loads(ln[len("check "):]) for ln in lines if ln.startswith("check ")]
            last = next((ln.split()[0] for ln in reversed(lines) if not ln.startswith("check ")), "check")
            landed[last] = landed.get(last, 0) + 1
        # a last look, after the last kill
        open(log_path, "w").close()
        pid = os.fork()
        if pid == 0:
            try:
                with open(log_path, "a") as f:
                    f.write("check " + json.dumps(check(url)) + "\n")
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        checks += [json.loads(ln[len("check "):]) for ln in open(log_path).read().splitlines()
                   if ln.startswith("check ")]
    finally:
        if os.path.exists(log_path):
            os.unlink(log_path)
    print(json.dumps({"trials": trials, "kills_landed_in": landed, "checks": len(checks),
                      "bad": [b for c in checks for b in c["bad"]], "final_steps": checks[-1]["steps"] if checks else []}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
