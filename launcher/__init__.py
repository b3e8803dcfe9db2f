"""Process-group setup, the strategy object, seeding, data sharding, preemption and rank-aware logging.

One entry point per concern; ``launcher`` knows nothing of checkpoints or models::

    import launcher

    def main(argv=None) -> int:
        args = get_args_parser().parse_args(argv)
        try:
            with launcher.distributed(args.strategy) as info:   # tears down on every exit
                log = launcher.get_logger(info)
                launcher.seed_everything(args.seed, rank=info.rank)
                strategy = launcher.strategy_for(info, sync_bn=args.sync_bn)
                model = strategy.wrap(build(args))
                ...
        except launcher.LaunchError as e:                      # wrong launch: one line, no traceback
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code                                 # 2
        return 0

    if __name__ == "__main__":
        launcher.run_main(main)   # exits without finalization after gloo: see launcher.exit_process
"""
from .dist import (STRATEGIES, DistInfo, all_reduce_sum, distributed, exit_process, open_store, resolve_timeout,
                   restart_attempt, run_main, setup, teardown)
from . import peers, watchdog
from .errors import LaunchError
from .log import get_logger
from .preempt import PREEMPTED_EXIT_CODE, Preemption, leave_signals_to_main, parse_signal, preemption_signals
from .sampling import EvalSampler, TrainSampler, per_rank_batch
from .seed import derive_seed, seed_everything
from .stragglers import Stragglers, gather_step_times
from .strategy import STRATEGY_CLASSES, Strategy, is_fsdp, strategy_for, sync_buffers, unsharded, wrap_model
from .watchdog import HUNG_EXIT_CODE, Watchdog

__all__ = [
    "STRATEGIES",
    "STRATEGY_CLASSES",
    "Strategy",
    "DistInfo",
    "EvalSampler",
    "HUNG_EXIT_CODE",
    "PREEMPTED_EXIT_CODE",
    "Preemption",
    "LaunchError",
    "Stragglers",
    "TrainSampler",
    "Watchdog",
    "all_reduce_sum",
    "derive_seed",
    "distributed",
    "exit_process",
    "gather_step_times",
    "get_logger",
    "is_fsdp",
    "leave_signals_to_main",
    "open_store",
    "parse_signal",
    "peers",
    "per_rank_batch",
    "preemption_signals",
    "resolve_timeout",
    "restart_attempt",
    "run_main",
    "seed_everything",
    "setup",
    "strategy_for",
    "sync_buffers",
    "teardown",
    "unsharded",
    "watchdog",
    "wrap_model",
]
