"""Worker for the FSDP2 checkpoint tests (launched by torchrun with gloo on CPU).

    save MODEL DIR   every rank trains one step of MODEL sharded with launcher.wrap_model(fsdp), then
                     checkpoint.save(model, DIR/model.safetensors), a CheckpointManager entry (with AdamW state),
                     and rank 0 writes torch's own get_model_state_dict(full_state_dict=True) to DIR/ref.pt;
                     then saves to a path under a regular file with FSDP, DDP and the manager and records,
                     per rank, whether each raised (DIR/fail.rankR.json).
                     Also two CheckpointManager(sharded=True) entries (one file per rank) in DIR/sharded.
    load MODEL DIR   builds MODEL with other weights, shards it, checkpoint.load(DIR/model.safetensors), and rank 0
                     writes get_model_state_dict(full) of the result to DIR/loaded-wW.pt and the report text; then the same from the sharded entry DIR/sharded/step-2 (sharded-loaded-wW.pt).
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

import checkpoint
import launcher
import models

BUILD = {  # uneven on purpose: hidden 10 and 5 classes at world 2 and 3
    "mlp": (lambda: models.build_model("mlp", in_features=12, hidden=10, num_classes=5), (4, 12)),
    "resnet18": (lambda: models.build_model("resnet18", num_classes=10, in_channels=1, small_input=True),
                 (4, 1, 8, 8)),
}
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class Tied(nn.Module):
    """A language-model-like head: the output layer shares the embedding's Parameter (10 rows: uneven at 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.body = nn.Linear(6, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(self.emb(x))))


def tied(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return Tied()


def build(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return BUILD[name][0]()


def try_save(fn) -> str | None:
    try:
        fn()
    except checkpoint.CheckpointError as e:
        return str(e).splitlines()[0]
    return None


def load_entry(entry: Path, out: Path, info) -> None:
    """The model train.py saved in ``entry`` (built from its manifest), sharded at this world size, loaded."""
    manifest = checkpoint.read_manifest(entry)
    model = launcher.wrap_model(models.build_model(manifest["model"], **manifest["model_options"]), info)
    report = checkpoint.load(entry, model)
    got = get_model_state_dict(model, options=FULL)
    if info.rank == 0:
        torch.save(got, out / f"entry-loaded-w{info.world_size}.pt")
        (out / f"entry-report-w{info.world_size}.txt").write_text(str(report))


def main() -> int:
    mode, name, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    if mode == "load-entry":  # name: a train.py entry
        with launcher.distributed("fsdp") as info:
            load_entry(Path(name), out, info)
            dist.barrier()
        return 0
    with launcher.distributed("fsdp") as info:
        rank, world = info.rank, info.world_size
        model = launcher.wrap_model(build(name, seed=0 if mode == "save" else 7), info)
        if mode == "save":
            opt = torch.optim.AdamW(model.parameters(), lr=0.05)
            g = torch.Generator().manual_seed(100 + rank)
            x = torch.randn(*BUILD[name][1], generator=g)
            y = torch.randint(0, 5, (x.shape[0],), generator=g)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            checkpoint.save(model, out / "model.safetensors", metadata={"model": name, "step": 1})
            ref = get_model_state_dict(model, options=FULL)
            ref_optim = get_optimizer_state_dict(model, opt, options=FULL)  # torch's full gather: the reference
            if rank == 0:
                torch.save(ref, out / "ref.pt")
                torch.save(ref_optim, out / "ref-optim.pt")
            mgr = checkpoint.CheckpointManager(out / "mgr")
            comps = {"model": model, "optimizer": checkpoint.OptimizerState(model, opt)}
            mgr.save(1, comps)
            sharded = checkpoint.CheckpointManager(out / "sharded", sharded=True, keep_last=0)
            sharded.save(1, comps)
            sharded.save(2, comps)
            blocker = out / "a-file"
            if rank == 0:
                blocker.write_text("not a directory")
            dist.barrier()
            ddp = nn.parallel.DistributedDataParallel(build(name, seed=1))
            failures = {
                "fsdp": try_save(lambda: checkpoint.save(model, blocker / "x.safetensors")),
                "ddp": try_save(lambda: checkpoint.save(ddp, blocker / "x.safetensors")),
                "manager": try_save(lambda: checkpoint.CheckpointManager(blocker / "ckpts").save(2, comps)),
            }
            (out / f"fail.rank{rank}.json").write_text(json.dumps(failures))
            if name == "mlp":  # tied weights under FSDP (file and sharded entry); torch's DCP of the sharded model
                t = launcher.wrap_model(tied(3), info)
                checkpoint.save(t, out / "tied.safetensors")
                checkpoint.CheckpointManager(out / "tied-sharded", sharded=True).save(1, {"model": t})
                tied_ref = get_model_state_dict(t, options=FULL)
                if rank == 0:
                    torch.save(tied_ref, out / "tied-ref.pt")
                import torch.distributed.checkpoint as dcp

                dcp.save(get_model_state_dict(model), checkpoint_id=str(out / "dcp"))
        else:
            report = checkpoint.load(out / "model.safetensors", model)
            got = get_model_state_dict(model, options=FULL)
            if rank == 0:
                torch.save(got, out / f"loaded-w{world}.pt")
                (out / f"report-w{world}.txt").write_text(str(report))
            # the sharded entry (written by 2 ranks, read by 3), AdamW state included: into FSDP and into DDP
            fresh = launcher.wrap_model(build(name, seed=8), info)
            opt = torch.optim.AdamW(fresh.parameters(), lr=0.05)
            mgr = checkpoint.CheckpointManager(out / "sharded")
            mgr.restore(out / "sharded" / "step-2", {"model": fresh, "optimizer": checkpoint.OptimizerState(fresh, opt)})
            got = get_model_state_dict(fresh, options=FULL)
            got_optim = get_optimizer_state_dict(fresh, opt, options=FULL)
            ddp = nn.parallel.DistributedDataParallel(build(name, seed=9))
            ddp_opt = torch.optim.AdamW(ddp.parameters(), lr=0.05)
            ddp_state = checkpoint.OptimizerState(ddp, ddp_opt)
            mgr.restore(out / "sharded" / "step-2", {"model": ddp, "optimizer": ddp_state})
            if name == "mlp":
                for src in ("tied.safetensors", "tied-sharded/step-1"):
                    t = launcher.wrap_model(tied(4), info)
                    checkpoint.load(out / src, t)
                    assert t.head.weight is t.emb.weight, "load untied the shared Parameter"
                    t_full = get_model_state_dict(t, options=FULL)
                    if rank == 0:
                        torch.save(t_full, out / f"tied-loaded-w{world}-{src.split('/')[0]}.pt")
                fresh_dcp = launcher.wrap_model(build(name, seed=10), info)
                checkpoint.load(out / "dcp", fresh_dcp)  # each rank: only the DCP chunks overlapping its shard
                dcp_full = get_model_state_dict(fresh_dcp, options=FULL)
                if rank == 0:
                    torch.save(dcp_full, out / f"dcp-loaded-w{world}.pt")
            if rank == 0:
                torch.save(got, out / f"sharded-loaded-w{world}.pt")
                torch.save(got_optim, out / f"sharded-optim-w{world}.pt")
                torch.save(ddp_state.state_dict(), out / f"ddp-optim-w{world}.pt")
        dist.barrier()
    return 0


if __name__ == "__main__":
    launcher.run_main(main)
