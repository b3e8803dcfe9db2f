"""Does ``convert`` of a memory-mapped ``.pth`` fit in a memory limit smaller than the file? Convert one under
a real memory limit and see.

    python bench/pages_probe.py [--size-mib 1536] [--limit-mib 768 ...] [--tree DIR]

Builds a ``.pth`` of ``--size-mib`` (float32 tensors of 4 MiB), then runs ``anytopo-ckpt convert`` to
safetensors in a child process placed in a memory cgroup created for it with a hard limit of
``--limit-mib`` (cgroup v2 ``memory.max`` where this machine has a writable v2 memory controller, else v1
``memory.limit_in_bytes``). The limit charges everything the child's pages cost: its anonymous memory AND
the page cache it faults in or dirties, which is the honest test of "does it fit in N MiB"; RLIMIT_AS
would count the file mapping itself (address space, not memory) and refuse the mapping outright.

``--tree DIR`` runs the converter from another checkout (e.g. ``git archive <commit> | tar -x -C DIR``),
so an older version can be measured side by side (docs/performance.md section 1b compared one that gave
pages back by hand, removed since: it made no difference).

    python bench/pages_probe.py --limit-mib 768 640 480

Prints one JSON line per run: exit status (137/-9 = killed by the OOM killer), the child's VmHWM, the
cgroup's peak charge and how often it hit the limit (v1 ``failcnt`` / v2 ``memory.events`` max), and
whether the output reads back equal to the input. Needs root (to create the cgroup) and Linux.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import sys
from checkpoint.cli import main
rc = main(["convert", sys.argv[1], sys.argv[2]])
print("VmHWM", [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")][0], file=sys.stderr)
sys.exit(rc)
"""


class Cgroup:
    """A memory cgroup made for one child, v2 if writable, else v1; removed on exit."""

    def __init__(self, limit: int):
        v2 = Path("/sys/fs/cgroup")
        if (v2 / "cgroup.controllers").is_file() and "memory" in (v2 / "cgroup.controllers").read_text().split():
            self.version, parent = 2, v2
        else:
            self.version, parent = 1, Path("/sys/fs/cgroup/memory")
            own = [l.split(":", 2)[2] for l in Path("/proc/self/cgroup").read_text().splitlines()
                   if l.split(":", 2)[1] == "memory"]
            if own and (parent / own[0].lstrip("/")).is_dir():
                parent = parent / own[0].lstrip("/")  # nested in our own: the limits above still apply
        self.path = parent / f"anytopo-pages-probe-{os.getpid()}"
        self.path.mkdir()
        if self.version == 2:
            (self.path / "memory.max").write_text(str(limit))
            if (self.path / "memory.swap.max").exists():
                (self.path / "memory.swap.max").write_text("0")
        else:
            (self.path / "memory.limit_in_bytes").write_text(str(limit))

    def enter_fn(self):
        procs = self.path / "cgroup.procs"
        return lambda: procs.write_text(str(os.getpid()))

    def stats(self) -> dict:
        if self.version == 2:
            peak = self.path / "memory.peak"
            events = dict(l.split() for l in (self.path / "memory.events").read_text().splitlines())
            return {"cgroup": "v2", "peak_mib": int(peak.read_text()) >> 20 if peak.exists() else None,
                    "hit_limit": int(events.get("max", 0)), "oom_kills": int(events.get("oom_kill", 0))}
        read = lambda name: int((self.path / name).read_text())  # noqa: E731
        oom = dict(l.split() for l in (self.path / "memory.oom_control").read_text().splitlines())
        return {"cgroup": "v1", "peak_mib": read("memory.max_usage_in_bytes") >> 20,
                "hit_limit": read("memory.failcnt"), "oom_kills": int(oom.get("oom_kill", 0))}

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def build_pth(path: Path, size_mib: int) -> None:
    import torch

    g = torch.Generator().manual_seed(0)
    torch.save({f"layer{i:04d}.weight": torch.randn(1024, 1024, generator=g) for i in range(size_mib // 4)}, path)


def same(pth: Path, st: Path) -> bool:
    import torch
    from safetensors import safe_open

    want = torch.load(pth, map_location="cpu", weights_only=True, mmap=True)
    with safe_open(st, framework="pt") as f:
        return set(f.keys()) == set(want) and all(torch.equal(f.get_tensor(k), want[k]) for k in want)


def run(src: Path, dst: Path, limit: int, tree: Path) -> dict:
    dst.unlink(missing_ok=True)
    fd = os.open(src, os.O_RDONLY)  # both runs start with the source out of the page cache (this file only:
    try:  # the machine is shared, so no global drop_caches)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    cg = Cgroup(limit)
    try:
        env = {**os.environ, "PYTHONPATH": str(tree)}
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", CHILD, str(src), str(dst)],
                              cwd=tree, env=env, capture_output=True, text=True, preexec_fn=cg.enter_fn(),
                              timeout=900)
        wall = time.perf_counter() - t0
        stats = cg.stats()
    finally:
        cg.remove()
    hwm = proc.stderr.split("VmHWM")[-1].split()[0] if "VmHWM" in proc.stderr else None
    return {"tree": str(tree), "rc": proc.returncode, "wall_s": round(wall, 1),
            "vmhwm_mib": int(hwm) >> 10 if hwm else None, **stats,
            "output_equal": proc.returncode == 0 and same(src, dst),
            "stderr_tail": proc.stderr.strip().splitlines()[-1:] if proc.returncode else []}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1536, help=".pth size (default 1536)")
    ap.add_argument("--limit-mib", type=int, nargs="+", default=[768], help="cgroup memory limit(s) (default 768)")
    ap.add_argument("--tree", type=Path, default=REPO, help="checkout whose converter runs (default: this one)")
    ap.add_argument("--dir", type=Path, default=None, help="scratch directory (default: a temp dir on disk)")
    args = ap.parse_args()
    if os.geteuid() != 0 or not sys.platform.startswith("linux"):
        print("error: needs root on Linux to create a memory cgroup; run it as root", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(dir=args.dir or "/var/tmp") as tmp:
        src, dst = Path(tmp) / "big.pth", Path(tmp) / "big.safetensors"
        build_pth(src, args.size_mib)
        print(json.dumps({"pth_mib": src.stat().st_size >> 20, "uptime": os.getloadavg()}), flush=True)
        for limit in args.limit_mib:
            print(json.dumps({"limit_mib": limit, **run(src, dst, limit << 20, args.tree.resolve())}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
