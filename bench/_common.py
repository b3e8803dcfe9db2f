"""Helpers the bench scripts share: machine facts, robust statistics, tables, JSON results, scratch dirs.

Not a benchmark. Every bench script prints ``uptime`` before and after its measurements, because this
machine is shared: a load average above the number of cores means the ratios carry extra noise, which
is why every target is a ratio of candidates measured side by side, interleaved, in one run.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
PYTHON = sys.executable


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """Environment for launched children: one thread each (2 cores here), no inherited launcher vars."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "GROUP_", "MASTER_", "TORCHELASTIC",
                                "ACCELERATE_", "SLURM_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore::UserWarning")
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------------ the machine

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 ** 2, 1)
    except OSError:
        pass
    return None


def machine() -> dict[str, Any]:
    """Date, CPU, cores, RAM, Python and library versions, load average."""
    import torch

    info: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": _cpu_model(),
        "nproc": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "mem_gib": _mem_total_gib(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "loadavg": list(os.getloadavg()),
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    try:
        import safetensors

        info["safetensors"] = safetensors.__version__
    except ImportError:
        pass
    return info


def uptime(label: str) -> dict[str, Any]:
    """Print ``uptime`` (label first) and return it with the load averages."""
    try:
        text = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        text = "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"[uptime {label}] {text}", flush=True)
    return {"label": label, "uptime": text, "loadavg": list(os.getloadavg())}


def noisy(uptimes: Sequence[dict[str, Any]]) -> bool:
    """True when the 1-minute load average exceeded 1 at any uptime reading (shared machine busy)."""
    return any(u["loadavg"][0] > 1.0 for u in uptimes)


# ------------------------------------------------------------------------------------------- statistics

def summarize(xs: Iterable[float]) -> dict[str, Any]:
    """median, min, max, n and the spread ((max - min) / median) of a sample."""
    xs = [float(x) for x in xs]
    if not xs:
        return {"n": 0, "median": float("nan"), "min": float("nan"), "max": float("nan"), "spread": float("nan")}
    med = statistics.median(xs)
    return {"n": len(xs), "median": med, "min": min(xs), "max": max(xs),
            "spread": (max(xs) - min(xs)) / med if med else float("nan"), "values": xs}


def ratio(ours: Sequence[float], base: Sequence[float]) -> dict[str, Any]:
    """median(ours) / median(base), plus the spread of the paired ratios ours[i] / base[i].

    Pairs are measured next to each other (same round), so the paired ratios show how much of the
    spread is common-mode machine noise (it cancels) and how much is the candidates' own.
    """
    med = statistics.median(ours) / statistics.median(base)
    paired = [a / b for a, b in zip(ours, base) if b > 0]
    return {"ratio": med, "paired_median": statistics.median(paired) if paired else float("nan"),
            "paired_min": min(paired) if paired else float("nan"),
            "paired_max": max(paired) if paired else float("nan")}


def interleave(candidates: dict[str, Callable[[], Any]], rounds: int, *, timer: Callable[[], float],
               between: Callable[[], None] | None = None, progress: bool = True) -> dict[str, list[float]]:
    """Run the candidates for ``rounds`` rounds, the order rotated each round (A B C, B C A, C A B, ...) so
    no candidate always runs first or always follows the same one; seconds per call, by name."""
    out: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = candidates[name]
            if between is not None:
                between()
            t0 = timer()
            fn()
            out[name].append(timer() - t0)
        if progress:
            print(f"  round {r + 1}/{rounds}: " + "  ".join(f"{n} {v[-1]:.4f}s" for n, v in out.items()), flush=True)
    return out


# --------------------------------------------------------------------------------------------- output

def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A fixed-width text table; ``columns`` are (key, header, format spec) and missing values print '-'."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        line = []
        for key, _, fmt in columns:
            v = row.get(key)
            if v is None or (isinstance(v, float) and v != v):
                line.append("-")
            elif fmt:
                line.append(format(v, fmt))
            else:
                line.append(str(v))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    fmt_row = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    lines = [fmt_row(cells[0]), "  ".join("-" * w for w in widths)] + [fmt_row(r) for r in cells[1:]]
    return "\n".join(lines)


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write ``bench/results/<name>.json`` (the directory is git-ignored) and return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, default=str, allow_nan=True) + "\n")
    print(f"wrote {path}")
    return path


def verdict(value: float, target: float) -> str:
    return "MET" if value <= target else "MISSED"


# -------------------------------------------------------------------------------------------- scratch

def fs_type(path: Path) -> str:
    """The filesystem type of the mount holding ``path`` (longest matching mount point in /proc/mounts)."""
    path = path.resolve()
    best, kind = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) < 3:
                continue
            mnt = parts[1]
            if (str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, kind = mnt, parts[2]
    except OSError:
        pass
    return kind


def scratch_dir(prefix: str, base: str | None = None) -> Path:
    """A fresh directory for temporary files on the repository's disk (never tmpfs), under
    ``bench/results/`` unless ``base`` is given; the caller removes it with :func:`remove`."""
    root = Path(base) if base else RESULTS
    root.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    if fs_type(path) in ("tmpfs", "ramfs"):
        shutil.rmtree(path, ignore_errors=True)
        raise SystemExit(f"error: {root} is on {fs_type(path)}; I/O benchmarks need a real disk: pass --tmp-dir")
    return path


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
