"""The training application's entry: parse the command line, run one training (or evaluation), tear down.

``scripts/train.py`` calls :func:`cli`; so can any program (``training.cli(["--model", "resnet18", ...])``).
Bad input exits 2 with one line on stderr (``--debug`` shows the traceback).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import checkpoint
import launcher

from .config import ConfigError, TrainConfig, dump_config, get_args_parser
from .reporting import OutputDirError
from .trainer import Preempted, Trainer


def main(args: argparse.Namespace) -> int:
    cfg = TrainConfig.from_args(args)
    if args.print_config:
        sys.stdout.write(dump_config(cfg))
        return 0
    # Signals are caught from the start (a SIGTERM during set-up still ends the run at its first step
    # boundary, with a checkpoint), and the previous handlers come back on every exit.
    with launcher.Preemption([cfg.preempt_signal] if cfg.preempt_signal else []) as preempt, \
            launcher.distributed(cfg.strategy, timeout_s=cfg.dist_timeout) as info:
        log = launcher.get_logger(info)
        trainer = Trainer(cfg, info, log)
        try:
            trainer.restore()
            trainer.preempt = preempt
            if cfg.eval_only:
                metrics = trainer.evaluate()
                final_loss, steps, ckpt = None, 0, trainer.resume_path
            else:
                final_loss, metrics, ckpt = trainer.fit()
                steps = trainer.step
            trainer.watch.phase("done", trainer.step)  # rank 0 writes the outputs while the others wait: not a hang

            def outputs() -> Any:  # rank 0's files; every rank learns whether they were written
                if not cfg.eval_only:
                    trainer.runlog.curves(trainer.task.primary)
                    trainer.runlog.hparams(cfg.to_dict(), {**metrics, "final_loss": final_loss})
                return trainer.runlog.summary(model=trainer.model_name, strategy=info.strategy,
                                              world_size=info.world_size, steps=steps, final_loss=final_loss,
                                              eval=metrics, checkpoint=str(ckpt) if ckpt else None)

            summary = trainer.agreed_write(outputs)
        except Preempted:
            return launcher.PREEMPTED_EXIT_CODE
        finally:
            trainer.watch.stop()
            trainer.manager.wait()  # no background write outlives the run's lock (an error path: already told)
            try:
                trainer.runlog.close()
            finally:
                if trainer.lock is not None:
                    trainer.lock.release()
        if info.is_main:
            log.info("%s: %s", "evaluated" if cfg.eval_only else "done",
                     ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            log.info("checkpoint: %s", ckpt)
            log.info("summary: %s", summary)
            if not cfg.eval_only:
                log.info("curves: %s", trainer.out / "curves.png")
    return 0


def cli(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        return main(args)
    except (ConfigError, OutputDirError, launcher.LaunchError, checkpoint.CheckpointError) as e:
        if args.debug:
            raise
        # one write of the whole line: ranks under torchrun share the stream, and print() writes the newline
        # separately, so two ranks' lines could run together
        sys.stderr.write(f"error: {checkpoint.errors.first_line(e)}\n")
        return 2
    except Exception as e:
        # a peer that died mid-collective: one line per survivor naming it, exit 1 (a restart resumes the run)
        line = None if args.debug else launcher.peers.describe(e, rank=_env_int("RANK", 0),
                                                               world_size=_env_int("WORLD_SIZE", 1))
        if line is None:
            raise
        sys.stderr.write(f"error: {line}\n")
        return 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else default


