"""Training-loop overhead: our ``Trainer.train_step`` vs a bare hand-written PyTorch loop, side by side.

Target: ours at most 3% slower per step (ratio = median step time ours / bare <= 1.03).

Ours: a ``Trainer`` from ``scripts/train.py`` built from the real parser and ``TrainConfig.from_args``
(single process, no TensorBoard, no progress bar, output in a temp dir); each step iterates
``trainer.loader`` (a torch DataLoader + TrainSampler) and calls
``trainer.train_step(trainer._to_device(x, y))``.
Bare: a plain ``torch.utils.data.DataLoader`` over the SAME dataset object and batch size (shuffle,
drop_last), a freshly built identical model (same registry name and options, same seed: the initial
weights are checked equal), ``AdamW`` with the same lr, and
``zero_grad; loss = F.cross_entropy(model(x), y); loss.backward(); opt.step(); sched.step()`` with a
``LambdaLR`` warmup-cosine schedule written inline.

How: ``torch.set_num_threads`` fixed (``--threads``, default 1: on a shared 2-core machine two threads
make single blocks swing by up to 10x); both loops warm up (10 steps each), then blocks of
``--block-steps`` (2) steps alternate ours, bare, ours, bare ... (``--blocks`` of each, default 30). A
block's time / steps is one sample (data loading included on both sides). Reported: median step time,
min/max, ratio of medians, the per-pair ratios (ours block i vs the bare block right after it), and the
same for process CPU time (``time.process_time``: not inflated by other processes' load). When the
ratio misses the target (full mode), both loops are profiled with cProfile and the top functions are
printed and stored (``--profile`` forces it).

    .venv/bin/python bench/train_loop.py --quick          # seconds
    .venv/bin/python bench/train_loop.py                  # resnet18 small_input, digits 8x8, batch 64
    .venv/bin/python bench/train_loop.py --data mnist5k   # 28x28: heavier steps, overhead share smaller
    .venv/bin/python bench/train_loop.py --device cuda --model resnet50 --image-size 224   # GPU (images/s)

    .venv/bin/python bench/train_loop.py --features [--quick]   # feature costs, see features()

Writes bench/results/train_loop.json (``--result-name`` to change; ``--results-dir`` to write elsewhere;
``--features`` writes train_loop_features.json).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import math
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

HERE = Path(__file__).resolve().parent

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from _common import RESULTS, machine, noisy, ratio, remove, summarize, table, uptime, verdict

TARGET = 1.03


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="seconds: 2 blocks of 4 steps each")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--data", default="digits", help="a scripts/train.py --data spec (digits, mnist5k, ...)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads, fixed for the run (1: steadiest on a shared machine)")
    p.add_argument("--warmup-steps", type=int, default=None, help="untimed steps per loop (default 10; quick 3)")
    p.add_argument("--block-steps", type=int, default=None, help="steps per timed block (default 2; quick 2)")
    p.add_argument("--blocks", type=int, default=None, help="timed blocks per loop (default 30; quick 3)")
    p.add_argument("--profile", action="store_true", help="cProfile both loops even when the target is met")
    p.add_argument("--features", action="store_true",
                   help="instead: cost of --ema, --compile (after warm-up) and --sync-bn at world 2 on the step time")
    p.add_argument("--syncbn-worker", action="store_true", help=argparse.SUPPRESS)  # run by --features under torchrun
    p.add_argument("--result-name", default="train_loop")
    p.add_argument("--results-dir", default=None, help=f"where the JSON goes (default {RESULTS})")
    return p


def cycle(loader, set_epoch: Callable[[int], None] | None = None) -> Iterator:
    """Batches forever, epoch after epoch (``set_epoch`` before each, like the training loop)."""
    epoch = 0
    while True:
        if set_epoch is not None:
            set_epoch(epoch)
        yield from loader
        epoch += 1


def warmup_cosine(total: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


def build(args: argparse.Namespace, out_dir: Path):
    """(trainer, ours_step, bare_step, info): both step functions take no argument and do one step."""
    import launcher
    import models
    import training

    argv = ["--model", args.model, "--data", args.data, "--batch-size", str(args.batch_size), "--lr", str(args.lr),
            "--output-dir", str(out_dir), "--no-tensorboard", "--no-progress", "--epochs", "1000",
            "--amp", args.amp, "--seed", "0"]
    if args.image_size:
        argv += ["--image-size", str(args.image_size)]
    if args.channels_last:
        argv += ["--channels-last"]
    cfg = training.TrainConfig.from_args(training.get_args_parser().parse_args(argv))
    info = launcher.setup("single")
    if info.device.type != args.device:
        raise SystemExit(f"error: asked for --device {args.device} but the launcher picked {info.device}")
    trainer = training.Trainer(cfg, info, launcher.get_logger(info))
    trainer.model.train()

    # bare: same dataset object, same batch, same model built the same way from the same seed
    launcher.seed_everything(cfg.seed)
    model = models.build_model(trainer.model_name, **trainer.model_options)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(info.device).train()
    same = all(torch.equal(a, b) for a, b in zip(trainer.bare.state_dict().values(), model.state_dict().values()))
    if not same:
        raise SystemExit("error: the bare model's initial weights differ from the Trainer's; the comparison is void")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(trainer.total_steps, max(1, trainer.total_steps // 20)))
    cuda = info.device.type == "cuda"
    loader = DataLoader(trainer.train_ds, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=0, pin_memory=cuda)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    scaler = torch.amp.GradScaler(info.device.type, enabled=args.amp == "fp16")
    dev = info.device

    ours_batches = cycle(trainer.loader, trainer.sampler.set_epoch)
    bare_batches = cycle(loader)

    def ours_step() -> None:
        x, y = next(ours_batches)
        trainer.train_step(trainer._to_device(x, y))

    def bare_step() -> None:
        x, y = next(bare_batches)
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        opt.zero_grad()
        if amp is None:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        else:
            with torch.autocast(dev.type, dtype=amp):
                loss = F.cross_entropy(model(x).float(), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        sched.step()

    return trainer, ours_step, bare_step, info


def profile(step: Callable[[], None], steps: int, top: int = 18) -> tuple[str, list[dict[str, Any]]]:
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(steps):
        step()
    pr.disable()
    buf = io.StringIO()
    st = pstats.Stats(pr, stream=buf).sort_stats("tottime")
    st.print_stats(top)
    rows = []
    for (fname, line, func), (cc, nc, tt, ct, _) in sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:top]:
        rows.append({"function": f"{Path(fname).name}:{line}({func})", "calls": nc, "tottime_s": tt, "cumtime_s": ct})
    return buf.getvalue(), rows


# ------------------------------------------------------------------------------------ feature costs

def _trainer(args: argparse.Namespace, out_dir: Path, extra: list[str], info):
    import launcher
    import training

    argv = ["--model", args.model, "--data", args.data, "--batch-size", str(args.batch_size), "--lr", str(args.lr),
            "--output-dir", str(out_dir), "--no-tensorboard", "--no-progress", "--epochs", "1000", "--seed", "0", *extra]
    if args.image_size:
        argv += ["--image-size", str(args.image_size)]
    cfg = training.TrainConfig.from_args(training.get_args_parser().parse_args(argv))
    trainer = training.Trainer(cfg, info, launcher.get_logger(info))
    trainer.model.train()
    batches = cycle(trainer.loader, trainer.sampler.set_epoch)

    def step() -> None:
        x, y = next(batches)
        trainer.train_step(trainer._to_device(x, y))
    return trainer, step


def _blocks(steps: dict[str, Callable[[], None]], blocks: int, nsteps: int) -> dict[str, list[float]]:
    """Seconds per step, in blocks of ``nsteps``, the candidates alternating block by block."""
    times: dict[str, list[float]] = {n: [] for n in steps}
    for _ in range(blocks):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(nsteps):
                step()
            times[name].append((time.perf_counter() - t0) / nsteps)
    return times


def syncbn_worker(args: argparse.Namespace) -> int:
    """Under torchrun (2 processes, gloo): DDP steps of the same model with plain BatchNorm and with --sync-bn's
    BatchNorm (launcher.wrap_model(sync_bn=True)), blocks alternating; rank 0 prints one JSON line."""
    import json

    import launcher
    import models

    torch.set_num_threads(args.threads)
    with launcher.distributed("ddp") as info:
        per_rank = args.batch_size // info.world_size
        nets = {}
        for name, sync in (("plain BN", False), ("sync-bn", True)):
            launcher.seed_everything(0)
            net = models.build_model(args.model, num_classes=10, in_channels=1, small_input=True)
            nets[name] = launcher.wrap_model(net, info, sync_bn=sync)
        opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-3) for n, m in nets.items()}
        g = torch.Generator().manual_seed(info.rank)
        x, y = torch.rand(per_rank, 1, 8, 8, generator=g), torch.randint(0, 10, (per_rank,), generator=g)

        def stepper(name):
            def step():
                opts[name].zero_grad()
                F.cross_entropy(nets[name](x), y).backward()
                opts[name].step()
            return step
        steps = {n: stepper(n) for n in nets}
        for step in steps.values():
            for _ in range(3):
                step()
        times = _blocks(steps, args.blocks or (3 if args.quick else 20), args.block_steps or 2)
        if info.is_main:
            print("SYNCBN " + json.dumps(times), flush=True)
    return 0


def features(args: argparse.Namespace) -> int:
    """Step-time cost of each feature, measured side by side in one run (blocks alternate):
    --ema (AveragedModel update after each step) and --compile (after warm-up) vs the plain Trainer step in
    one process; --sync-bn vs plain BatchNorm in a 2-process DDP step (torchrun, gloo)."""
    import json
    import subprocess

    import launcher

    torch.set_num_threads(args.threads)
    q = args.quick
    blocks, nsteps = args.blocks or (3 if q else 20), args.block_steps or 2
    result: dict[str, Any] = {"bench": "train_loop_features", "quick": q, "machine": machine(), "argv": sys.argv,
                              "uptime": [uptime("before")]}
    rows = []
    dirs = [Path(tempfile.mkdtemp(prefix="train_loop-")) for _ in range(3)]
    try:
        info = launcher.setup("single")
        variants = {"plain": [], "--ema 0.999": ["--ema", "0.999"], "--compile": ["--compile"]}
        steps = {}
        for (name, extra), d in zip(variants.items(), dirs):
            trainer, steps[name] = _trainer(args, d, extra, info)
            t0 = time.perf_counter()
            for _ in range(args.warmup_steps or (3 if q else 10)):  # includes compiling
                steps[name]()
            print(f"{name}: warm-up {time.perf_counter() - t0:.1f} s", flush=True)
        times = _blocks(steps, blocks, nsteps)
        base = summarize(times["plain"])["median"]
        for name, xs in times.items():
            s = summarize(xs)
            rows.append({"row": f"{name} (1 process)", "median_ms": s["median"] * 1e3, "spread": s["spread"],
                         "ratio": s["median"] / base, "paired_median": ratio(xs, times["plain"])["paired_median"]})
    finally:
        launcher.teardown()
        for d in dirs:
            remove(d)
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2", __file__,
           "--syncbn-worker", "--model", args.model, "--batch-size", str(args.batch_size), "--threads", str(args.threads),
           *(["--quick"] if q else []), *(["--blocks", str(args.blocks)] if args.blocks else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("SYNCBN ")), None)
    if line is None:
        raise SystemExit(f"error: the sync-bn worker failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    st = json.loads(line[len("SYNCBN "):])
    base = summarize(st["plain BN"])["median"]
    for name, xs in st.items():
        s = summarize(xs)
        rows.append({"row": f"{name} (ddp, 2 processes, gloo)", "median_ms": s["median"] * 1e3, "spread": s["spread"],
                     "ratio": s["median"] / base, "paired_median": ratio(xs, st["plain BN"])["paired_median"]})
    result["uptime"].append(uptime("after"))
    result.update(rows=rows, config=vars(args), noisy=noisy(result["uptime"]))
    print(table(rows, [("row", "variant", ""), ("median_ms", "median ms/step", ".2f"), ("spread", "spread", ".0%"),
                       ("ratio", "ratio to its plain row", ".3f"), ("paired_median", "paired med", ".3f")]))
    if result["noisy"]:
        print("note: load average was > 1 during the run (shared machine): expect extra spread")
    from _common import write_result

    write_result(args.result_name + "_features", result)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the launcher would pick a GPU if one were visible
    if args.syncbn_worker:
        return syncbn_worker(args)
    if args.features:
        return features(args)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the launcher would pick a GPU if one were visible
    q = args.quick
    warm = args.warmup_steps if args.warmup_steps is not None else (3 if q else 10)
    nsteps = args.block_steps or 2
    blocks = args.blocks or (3 if q else 30)
    torch.set_num_threads(args.threads)
    out_dir = Path(tempfile.mkdtemp(prefix="train_loop-"))
    result: dict[str, Any] = {"bench": "train_loop", "quick": q, "machine": machine(), "argv": sys.argv,
                              "config": {**vars(args), "warmup_steps": warm, "block_steps": nsteps, "blocks": blocks},
                              "uptime": []}
    import launcher

    try:
        trainer, ours_step, bare_step, info = build(args, out_dir)
        sync = torch.cuda.synchronize if info.device.type == "cuda" else (lambda: None)
        print(f"{args.model} {trainer.model_options} on {args.data} (train {len(trainer.train_ds)} samples), "
              f"batch {args.batch_size}, device {info.device}, threads {torch.get_num_threads()}, amp {args.amp}")
        for _ in range(warm):
            ours_step()
        for _ in range(warm):
            bare_step()
        sync()
        result["uptime"].append(uptime("before"))
        names = ("ours Trainer.train_step", "bare loop")
        times: dict[str, list[float]] = {n: [] for n in names}
        cpu: dict[str, list[float]] = {n: [] for n in names}
        for b in range(blocks):
            for name, step in zip(names, (ours_step, bare_step)):
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(nsteps):
                    step()
                sync()
                times[name].append((time.perf_counter() - t0) / nsteps)
                cpu[name].append((time.process_time() - c0) / nsteps)
            if blocks <= 12 or (b + 1) % 5 == 0 or b + 1 == blocks:
                print(f"  block {b + 1}/{blocks}: " + "  ".join(
                    f"{n} {v[-1] * 1e3:.2f} ms/step (cpu {cpu[n][-1] * 1e3:.2f})" for n, v in times.items()), flush=True)
        result["uptime"].append(uptime("after"))
        ours, bare = times[names[0]], times[names[1]]
        r = ratio(ours, bare)
        rc = ratio(cpu[names[0]], cpu[names[1]])
        rows = []
        for name, xs in times.items():
            s, sc = summarize(xs), summarize(cpu[name])
            rows.append({"loop": name, "median_ms": s["median"] * 1e3, "min_ms": s["min"] * 1e3, "max_ms": s["max"] * 1e3,
                         "spread": s["spread"], "img_s": args.batch_size / s["median"],
                         "ratio": s["median"] / summarize(bare)["median"], "cpu_median_ms": sc["median"] * 1e3,
                         "cpu_ratio": sc["median"] / summarize(cpu[names[1]])["median"], "step_s": xs, "cpu_s": cpu[name]})
        rows[0].update(paired_median=r["paired_median"], paired_min=r["paired_min"], paired_max=r["paired_max"])
        print(table(rows, [("loop", "loop", ""), ("median_ms", "median ms/step", ".2f"), ("min_ms", "min", ".2f"),
                           ("max_ms", "max", ".2f"), ("spread", "spread", ".0%"), ("img_s", "images/s", ".0f"),
                           ("ratio", "ratio", ".3f"), ("paired_median", "paired med", ".3f"),
                           ("paired_min", "paired min", ".3f"), ("paired_max", "paired max", ".3f"),
                           ("cpu_median_ms", "cpu ms/step", ".2f"), ("cpu_ratio", "cpu ratio", ".3f")]))
        result["cpu_ratio"] = rc["ratio"]
        result["cpu_paired"] = rc
        result.update(rows=rows, ratio=r["ratio"], paired=r, target=TARGET, verdict=verdict(r["ratio"], TARGET))
        if args.profile or (r["ratio"] > TARGET and not q):
            psteps = max(nsteps, 20)
            print(f"\nprofile (cProfile, {psteps} steps each, sorted by own time):")
            for name, step in (("ours", ours_step), ("bare", bare_step)):
                text, prow = profile(step, psteps)
                result.setdefault("profile", {})[name] = prow
                print(f"--- {name}\n" + "\n".join(text.strip().splitlines()[:32]))
        trainer.runlog.close()
    finally:
        launcher.teardown()
        remove(out_dir)
    result["noisy"] = noisy(result["uptime"])
    print(f"\nsummary: ours/bare = {result['ratio']:.3f} wall (paired median {result['paired']['paired_median']:.3f}, "
          f"min {result['paired']['paired_min']:.3f}, max {result['paired']['paired_max']:.3f}); "
          f"target <= {TARGET}: {result['verdict']}" + (" (QUICK mode)" if q else ""))
    print(f"         process CPU time ours/bare = {result['cpu_ratio']:.3f} (paired median "
          f"{result['cpu_paired']['paired_median']:.3f}): {verdict(result['cpu_ratio'], TARGET)}")
    if result["noisy"]:
        print("note: load average was > 1 during the run (shared machine): expect extra spread")
    if args.results_dir:
        import json

        d = Path(args.results_dir)
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{args.result_name}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"wrote {d / (args.result_name + '.json')}")
    else:
        from _common import write_result

        write_result(args.result_name, result)
    return 0


if __name__ == "__main__":
    import launcher
    launcher.run_main(main)
