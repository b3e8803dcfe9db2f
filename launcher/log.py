"""One rank-aware logger: the main rank logs INFO, the others WARNING and above."""
from __future__ import annotations

import logging
import sys

from .dist import DistInfo
from .env import read_env
from .errors import LaunchError

_MARK = "_anytopo_handler"


def get_logger(info: DistInfo | None = None, name: str = "anytopo") -> logging.Logger:
    """Configure and return the logger ``name`` for this rank.

    Rank 0 gets INFO and above, other ranks WARNING and above, on stderr. With more than one process each
    line carries ``[rank R/W]``. Calling again (e.g. first without ``info``, then with the ``DistInfo`` of
    :func:`launcher.setup`) replaces the handler instead of adding a second. Child loggers (``anytopo.x``)
    go through it; it does not propagate to the root logger, so lines are not printed twice.

    Args:
        info: this process's place in the run. Without it the rank is read from the launch environment
            (``RANK``/``WORLD_SIZE``, ``SLURM_PROCID``/``SLURM_NTASKS``), so messages logged before
            :func:`launcher.setup` are filtered by rank too.
        name: the logger's name.

    Example:
        >>> log = get_logger(info)
        >>> log.info("epoch %d: loss %.4f", epoch, loss)  # printed once, by rank 0
    """
    if info is not None:
        rank, world = info.rank, info.world_size
    else:
        try:
            env = read_env()
            rank, world = env.rank, env.world_size
        except LaunchError:  # setup() will report it; log as if alone until then
            rank, world = 0, 1
    logger = logging.getLogger(name)
    for h in [h for h in logger.handlers if getattr(h, _MARK, False)]:
        logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    setattr(handler, _MARK, True)
    tag = f" [rank {rank}/{world}]" if world > 1 else ""
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s{tag} %(name)s: %(message)s",
                                           datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False
    return logger
