"""Process-group setup, strategy wrapping, seeding, data sharding and rank-aware logging.

One entry point per concern; ``launcher`` knows nothing of checkpoints or models::

    import launcher

    def main(argv=None) -> int:
        args = get_args_parser().parse_args(argv)
        try:
            with launcher.distributed(args.strategy) as info:   # tears down on every exit
                log = launcher.get_logger(info)
                launcher.seed_everything(args.seed, rank=info.rank)
                model = launcher.wrap_model(build(args), info, sync_bn=args.sync_bn)
                ...
        except launcher.LaunchError as e:                      # wrong launch: one line, no traceback
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code                                 # 2
        return 0

    if __name__ == "__main__":
        launcher.run_main(main)   # exits without finalization after gloo: see launcher.exit_process
"""
from .dist import (STRATEGIES, DistInfo, all_gather_object, all_reduce_sum, broadcast_object, distributed,
                   exit_process, restart_attempt, run_main, setup, teardown)
from .errors import LaunchError
from .log import get_logger
from .preempt import PREEMPTED_EXIT_CODE, Preemption, agree_flags, parse_signal
from .sampling import EvalSampler, TrainSampler, per_rank_batch
from .seed import derive_seed, seed_everything
from .wrap import is_fsdp, sync_buffers, unsharded, wrap_model

__all__ = [
    "STRATEGIES",
    "DistInfo",
    "EvalSampler",
    "PREEMPTED_EXIT_CODE",
    "Preemption",
    "LaunchError",
    "TrainSampler",
    "agree_flags",
    "all_gather_object",
    "all_reduce_sum",
    "broadcast_object",
    "derive_seed",
    "distributed",
    "exit_process",
    "get_logger",
    "is_fsdp",
    "parse_signal",
    "per_rank_batch",
    "restart_attempt",
    "run_main",
    "seed_everything",
    "setup",
    "sync_buffers",
    "teardown",
    "unsharded",
    "wrap_model",
]
