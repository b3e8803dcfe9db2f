"""Worker for the DCP streaming tests: every rank saves the same tensors with dcp.save, the 2-D ones as DTensors
sharded by rows (Shard(0), uneven: 5 rows over 2 ranks are 3 + 2), so the folder holds one saved chunk per rank.

    torchrun --nproc_per_node=2 tests/_dcp_worker.py DIR
"""
import sys
import warnings

import torch
import torch.distributed as dist

import launcher


def tensors() -> dict[str, torch.Tensor]:
    """What is saved (the test rebuilds it to compare): float32, bfloat16 and int64 row-sharded, a 0-dim one,
    and a replicated float32 one."""
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(5, 3, generator=g), "b": torch.randn(7, 2, generator=g).to(torch.bfloat16),
            "i": torch.randint(-2**62, 2**62, (5, 2), generator=g), "s": torch.tensor(3.25),
            "r": torch.randn(4, 3, generator=g)}


SHARDED = ("w", "b", "i")


def main() -> int:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    warnings.simplefilter("ignore")
    dist.init_process_group("gloo")
    try:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        state = {k: distribute_tensor(v, mesh, [Shard(0)]) if k in SHARDED else v for k, v in tensors().items()}
        dcp.save(state, checkpoint_id=sys.argv[1])
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    launcher.run_main(main)
