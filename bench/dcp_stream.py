"""Peak memory of reading a torch.distributed.checkpoint (DCP) folder: inspect, convert, load.

    .venv/bin/python bench/dcp_stream.py [--sizes-gb 1 4] [--hidden 8192]

For each size, a model of square Linear layers (``--hidden`` x ``--hidden`` float32 weights, 268 MB each at
8192; as many layers as make the size) is saved with ``dcp.save`` from one process. Then, each in a fresh
process started by ``bench/_peak_rss.py`` (so the peak is that process's own):
``python -c "import torch, checkpoint"`` (the baseline), ``anytopo-ckpt inspect DIR``, ``anytopo-ckpt convert
DIR out.safetensors``, and ``checkpoint.load(DIR, model)`` into a model already built (its own weights are
subtracted: the growth is measured above the RSS after building it). convert and load run twice, side by
side: as shipped (each saved chunk's bytes straight from the .distcp files, checkpoint/_dcp_stream.py) and
with that path switched off (every tensor through DCP's reader, the fallback); the two converted files must
hold identical data (sha256 of the data section) and both loads must give the saved weights. Target
(issue 9): peak RSS beyond the baseline <= 0.3x the checkpoint's size.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

from _common import PYTHON, REPO, fmt_bytes, machine, remove, scratch_dir, write_result

MODES = ("direct", "dcp-reader")
PEAK = [PYTHON, "-S", str(REPO / "bench" / "_peak_rss.py"), "--"]

# argv: DIR HIDDEN LAYERS MODE; MODE "dcp-reader" switches the direct path off (every chunk through DCP's reader)
SWITCH = r"""
import sys
if sys.argv[-1] == "dcp-reader":
    import checkpoint.dcp as _s
    _s.chunk_data_offset = lambda *a, **k: None
"""

LOAD = SWITCH + r"""
import json, torch
from torch import nn
import checkpoint
hidden, layers = int(sys.argv[2]), int(sys.argv[3])
model = nn.Sequential(*[nn.Linear(hidden, hidden) for _ in range(layers)])
with open("/proc/self/statm") as f:
    before = int(f.read().split()[1]) * 4096
report = checkpoint.load(sys.argv[1], model)
assert report.ok, str(report)
import resource
maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
torch.manual_seed(0)  # the weights make_dcp saved: rebuilt layer by layer and compared
for layer in model:
    want = nn.Linear(hidden, hidden)
    assert torch.equal(layer.weight, want.weight) and torch.equal(layer.bias, want.bias)
    del want
print(json.dumps({"before": before, "maxrss": maxrss}), file=sys.stderr)
"""

CONVERT = SWITCH + r"""
from checkpoint.cli import main
sys.exit(main(["convert", sys.argv[1], sys.argv[2]]))
"""


def data_sha256(path: Path) -> str:
    """sha256 of a safetensors file's data section (its header holds the conversion time)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n)
        while piece := f.read(16 << 20):
            h.update(piece)
    return h.hexdigest()


def peak(cmd: list[str]) -> tuple[int, float, str]:
    proc = subprocess.run([*PEAK, *cmd], cwd=REPO, capture_output=True, text=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["rc"] != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    return out["ru_maxrss_kib"] * 1024, out["wall_s"], proc.stderr


def make_dcp(path: Path, hidden: int, layers: int) -> int:
    code = r"""
import sys, warnings, torch
from torch import nn
import torch.distributed.checkpoint as dcp
warnings.simplefilter("ignore")
hidden, layers = int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
with torch.no_grad():
    model = nn.Sequential(*[nn.Linear(hidden, hidden) for _ in range(layers)])
dcp.save(model.state_dict(), checkpoint_id=sys.argv[1])
"""
    subprocess.run([PYTHON, "-c", code, str(path), str(hidden), str(layers)], cwd=REPO, check=True)
    return sum(p.stat().st_size for p in path.iterdir())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes-gb", type=float, nargs="+", default=[1.0, 4.0])
    p.add_argument("--hidden", type=int, default=8192)
    p.add_argument("--dir", default=None, help="scratch directory (default: a temp dir on the repo's disk)")
    args = p.parse_args()
    cli = [PYTHON, "-m", "checkpoint"]
    base_rss, _, _ = peak([PYTHON, "-c", "import torch, checkpoint"])
    rows = []
    for gb in args.sizes_gb:
        layer_bytes = (args.hidden * args.hidden + args.hidden) * 4
        layers = max(1, round(gb * 1e9 / layer_bytes))
        work = scratch_dir("dcp-stream", args.dir)
        try:
            src = work / "dcp"
            size = make_dcp(src, args.hidden, layers)
            largest = args.hidden * args.hidden * 4
            row = {"size": size, "layers": layers, "largest_tensor": largest, "baseline_rss": base_rss}
            rss, wall, _ = peak([*cli, "inspect", str(src)])
            row["inspect"] = {"peak_beyond_baseline": rss - base_rss, "x_size": (rss - base_rss) / size,
                              "wall_s": wall}
            digests = {}
            for mode in MODES:
                out = work / f"out-{mode}.safetensors"
                rss, wall, _ = peak([PYTHON, "-c", CONVERT, str(src), str(out), mode])
                row[f"convert_{mode}"] = {"peak_beyond_baseline": rss - base_rss, "x_size": (rss - base_rss) / size,
                                          "wall_s": wall}
                digests[mode] = data_sha256(out)
                out.unlink()
            if len(set(digests.values())) != 1:
                raise SystemExit(f"error: the converted files differ between {' and '.join(MODES)}: {digests}")
            for mode in MODES:
                rss, wall, err = peak([PYTHON, "-c", LOAD, str(src), str(args.hidden), str(layers), mode])
                inner = json.loads([ln for ln in err.splitlines() if ln.startswith("{")][-1])
                grown = inner["maxrss"] - inner["before"]
                row[f"load_{mode}"] = {"peak_beyond_model": grown, "x_size": grown / size, "wall_s": wall}
            rows.append(row)

            def cell(key: str, what: str = "peak_beyond_baseline") -> str:
                r = row[key]
                return f"+{fmt_bytes(r[what])} ({r['x_size']:.3f}x, {r['wall_s']:.1f} s)"

            print(f"{fmt_bytes(size)} DCP ({layers} x {args.hidden}^2, largest tensor {fmt_bytes(largest)}): "
                  f"inspect {cell('inspect')}; convert direct {cell('convert_direct')} vs DCP reader "
                  f"{cell('convert_dcp-reader')} (same data sha256); "
                  f"load direct {cell('load_direct', 'peak_beyond_model')}"
                  f" vs DCP reader {cell('load_dcp-reader', 'peak_beyond_model')} above the built model; "
                  f"baseline import torch+checkpoint {fmt_bytes(base_rss)}", flush=True)
        finally:
            remove(work)
    path = write_result("dcp_stream", {"machine": machine(), "rows": rows})
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
