"""Worker for tests/test_fsdp.py's parallel-write test (torchrun, gloo on CPU, any world size).

    DIR   every rank shards an uneven MLP (launcher.wrap_model(fsdp)) and saves it four times:
          parallel.safetensors   checkpoint.save as is: every rank writes its own rows into the one file;
          streamed.safetensors   the same, with rank 1 unable to open rank 0's temporary file (os.open refused
                                 for it): the file's shards are streamed to rank 0 instead;
          failed.safetensors     rank 2's (else the last rank's) own write raises ENOSPC: every rank must raise;
          sharded/               CheckpointManager(sharded=True): one file per rank, hashed while written.
          Rank 0 writes torch's get_model_state_dict(full_state_dict=True) to DIR/ref.pt; every rank writes
          DIR/rank{R}.json: its rows-written calls per save and the error each save raised (None: none).
"""
import errno
import json
import os
import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

import checkpoint
import launcher
import models
from checkpoint import gather


def main() -> int:
    out = Path(sys.argv[1])
    with launcher.distributed("fsdp") as info:
        rank, world = info.rank, info.world_size
        torch.manual_seed(0)
        model = launcher.wrap_model(models.build_model("mlp", in_features=12, hidden=10, num_classes=5), info)
        calls = {"n": 0}
        pwrite = gather._pwrite_all

        def counted(fd, t, offset):
            calls["n"] += t.numel() > 0
            return pwrite(fd, t, offset)

        gather._pwrite_all = counted
        record: dict = {"pwrites": {}, "errors": {}}

        def attempt(name, fn):
            calls["n"] = 0
            try:
                fn()
                record["errors"][name] = None
            except Exception as e:  # noqa: BLE001 -- recorded for the test
                record["errors"][name] = f"{type(e).__name__}: {e}"
            record["pwrites"][name] = calls["n"]

        attempt("parallel", lambda: checkpoint.save(model, out / "parallel.safetensors"))

        real_open = os.open
        if rank == 1:  # this rank cannot open the writer's file (as on a node without the shared filesystem)
            os.open = lambda path, *a, **k: (_ for _ in ()).throw(PermissionError(errno.EACCES, "refused", path)) \
                if str(path).endswith(".tmp") else real_open(path, *a, **k)
        attempt("streamed", lambda: checkpoint.save(model, out / "streamed.safetensors"))
        os.open = real_open

        if rank == min(2, world - 1):
            def full_disk(fd, t, offset):
                raise OSError(errno.ENOSPC, "No space left on device")
            gather._pwrite_all = full_disk
        attempt("failed", lambda: checkpoint.save(model, out / "failed.safetensors"))
        gather._pwrite_all = counted

        attempt("sharded", lambda: checkpoint.CheckpointManager(out / "sharded", sharded=True).save(1, {"model": model}))
        ref = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save(ref, out / "ref.pt")
        (out / f"rank{rank}.json").write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    launcher.run_main(main)
