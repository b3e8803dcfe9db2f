"""scripts/train.py's Trainer under torchrun, with each train step timed (used by bench/ddp_step.py).

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 bench/_ours_ddp.py --steps 22 -- \\
        --strategy ddp --model resnet18 --data digits --batch-size 64 --output-dir DIR --no-tensorboard --no-progress

Arguments after ``--`` are scripts/train.py's own flags. The Trainer is built exactly as ``train.main()``
builds it (``TrainConfig.from_args`` of the real parser, ``launcher.distributed``, ``Trainer``,
``restore``); then the loop of ``Trainer.fit`` without its logging and evaluation: per epoch
``sampler.set_epoch``/``set_start``, and for each batch of ``trainer.loader``
``trainer.train_step(trainer._to_device(x, y))``, timed from the end of the previous step like
bench/minimal_ddp.py. Rank 0 prints one JSON line ``{"step_s": [...], ...}``. Nothing in train.py changes.
``--log-every N`` adds fit()'s per-window work (``_global_mean`` all-reduce + ``runlog.log``), timed
apart in ``log_s``, to find what separates the CLI's metrics.csv windows from the bare step time.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import launcher
import training


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" in argv:
        i = argv.index("--")
        own_argv, train_argv = argv[:i], argv[i + 1:]
    else:
        own_argv, train_argv = argv, []
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=22)
    p.add_argument("--log-every", type=int, default=0,
                   help="also do what Trainer.fit does every N steps (loss all-reduce via _global_mean, then "
                        "runlog.log on rank 0), timed separately in log_s; 0: never")
    ours = p.parse_args(own_argv)
    cfg = training.TrainConfig.from_args(training.get_args_parser().parse_args(train_argv))
    with launcher.distributed(cfg.strategy) as info:
        trainer = training.Trainer(cfg, info, launcher.get_logger(info))
        try:
            trainer.restore()
            trainer.model.train()
            step_s: list[float] = []
            log_s: list[list[float]] = []  # [step, _global_mean seconds, runlog.log seconds]
            epoch, loss = 0, None
            t_prev = time.perf_counter()
            while trainer.step < ours.steps:
                trainer.sampler.set_epoch(epoch)
                trainer.sampler.set_start(0, trainer.per_rank)
                for images, targets in trainer.loader:
                    loss = trainer.train_step(trainer._to_device(images, targets))
                    trainer.step += 1
                    if ours.log_every and trainer.step % ours.log_every == 0:
                        t0 = time.perf_counter()
                        value = trainer._global_mean(loss)
                        t1 = time.perf_counter()
                        trainer.runlog.log(trainer.step, epoch=epoch, loss=value,
                                           lr=trainer.scheduler.get_last_lr()[0], throughput=0.0)
                        log_s.append([trainer.step, t1 - t0, time.perf_counter() - t1])
                    now = time.perf_counter()
                    step_s.append(now - t_prev)
                    t_prev = now
                    if trainer.step == ours.steps:
                        break
                epoch += 1
            if info.is_main:
                print(json.dumps({"script": "_ours_ddp", "world_size": info.world_size, "steps": trainer.step,
                                  "steps_per_epoch": trainer.steps_per_epoch, "threads": torch.get_num_threads(),
                                  "final_loss": float(loss) if loss is not None else None, "step_s": step_s,
                                  "log_s": log_s}),
                      flush=True)
        finally:
            trainer.runlog.close()
    return 0


if __name__ == "__main__":
    launcher.run_main(main)
