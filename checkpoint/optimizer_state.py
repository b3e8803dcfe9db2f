"""``OptimizerState``: an optimizer as a checkpoint component whose state is keyed by parameter name."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .dtensors import is_sharded_state
from .rank_files import has_sources, local_optimizer_state, materialize_sources
from .wrappers import unwrap


class OptimizerState:
    """An optimizer seen as a component whose state is keyed by parameter NAME, not index.

    Names are those of the bare model (``unwrap(model).named_parameters()``), so the state survives
    wrapping changes (DDP <-> DP <-> single <-> compiled) and parameter-group regrouping. Built on
    ``torch.distributed.checkpoint.state_dict.get/set_optimizer_state_dict``.

    For a sharded model (FSDP2) ``state_dict`` gathers full tensors on rank 0 (the writer; other ranks
    get an empty dict) and ``load_state_dict`` takes full tensors into each rank's shards, so it is the same
    name-keyed state a single process or DDP saves and loads: runs move between FSDP, DDP and one process at
    any world size with their AdamW moments intact. ``local_state_dict`` is the state a sharded entry writes:
    each rank's own shards (DTensors), never gathered; ``load_state_dict`` also takes that state back as read
    from such an entry (each FSDP rank reading only its own block).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model = model
        self.optimizer = optimizer
        self._names: tuple[tuple[int, ...], list[str]] | None = None  # (param ids in group order, their names)

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        model = unwrap(self.model)
        options = self._options(model, saving=True)
        if options is None:
            fast = self._renamed_state_dict()
            if fast is not None:
                return fast
        sd = get_optimizer_state_dict(model, self.optimizer, options=options)
        if options is None:
            self._learn_names(sd)
        return sd

    def _ids(self) -> tuple[int, ...]:
        return tuple(id(p) for group in self.optimizer.param_groups for p in group["params"])

    def _learn_names(self, sd: dict[str, Any]) -> None:
        """Remember the name torch's helper gave each parameter (it knows every wrapper's naming), so the next
        calls can rename ``optimizer.state_dict()`` themselves: the helper costs ~15 ms a call on ResNet-18,
        most of a snapshot's overhead over its bare copy (bench/ckpt_stall.py)."""
        names = [n for group in sd.get("param_groups", []) for n in group.get("params", [])]
        ids = self._ids()
        self._names = (ids, names) if len(names) == len(ids) and len(set(names)) == len(names) else None

    def _renamed_state_dict(self) -> dict[str, Any] | None:
        """What ``get_optimizer_state_dict`` returns for an unsharded model (the optimizer's own state_dict,
        indices replaced by parameter names, same order), built from the names it gave last time; None when
        they are not known for the current parameter groups, or the state is still empty (torch's helper then
        initialises it)."""
        if self._names is None or not self.optimizer.state or self._names[0] != self._ids():
            return None
        names = self._names[1]
        sd = self.optimizer.state_dict()
        sd["state"] = {names[pid]: v for pid, v in sd["state"].items()}
        for group in sd["param_groups"]:
            group["params"] = [names[pid] for pid in group["params"]]
        return sd

    def local_state_dict(self) -> dict[str, Any]:
        """This rank's part of the state, never gathered: DTensor moments for a sharded model (what
        ``CheckpointManager(sharded=True)`` writes rank by rank); ``state_dict()`` for any other model."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        model = unwrap(self.model)
        if not is_sharded_state(dict(model.named_parameters())):
            return self.state_dict()
        return get_optimizer_state_dict(model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load(state, sources=None)

    def _load(self, state: dict[str, Any], *, sources: bool | None) -> None:
        """``load_state_dict``; ``sources`` False when the caller knows ``state`` holds only tensors (read from
        an entry that is not sharded), which spares walking it (~1 ms for ResNet-152's AdamW state); None
        looks."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        model = unwrap(self.model)
        params = dict(model.named_parameters())  # one walk of the modules, shared by the checks below
        options = self._options(model, saving=False, params=params)
        if sources is not False and has_sources(state):  # read from a sharded entry: tensors still on disk
            if is_sharded_state(params):  # each rank reads its own block, loaded as sharded state
                state, options = local_optimizer_state(state, params), StateDictOptions(full_state_dict=False)
            else:
                state = materialize_sources(state)
        if options is None and self._load_by_index(params, state):
            return
        set_optimizer_state_dict(model, self.optimizer, state, options=options)

    def _load_by_index(self, params: dict[str, nn.Parameter], state: dict[str, Any]) -> bool:
        """The common case without torch.distributed.checkpoint's per-parameter name resolution (a fifth of a
        ResNet-152 + AdamW restore): when the saved groups list exactly the live groups' parameter names, in
        order, the name-keyed state maps onto ``Optimizer.load_state_dict``'s indices one to one. Anything
        else (regrouped parameters, names DCP spells differently) returns False: DCP's path handles it."""
        groups = state.get("param_groups") if isinstance(state, dict) else None
        saved_state = state.get("state") if isinstance(state, dict) else None
        if not isinstance(groups, list) or not isinstance(saved_state, dict) \
                or len(groups) != len(self.optimizer.param_groups):
            return False
        names = {id(p): n for n, p in params.items()}
        index: dict[str, int] = {}
        for live, saved in zip(self.optimizer.param_groups, groups):
            live_names = [names.get(id(p)) for p in live["params"]]
            if not isinstance(saved, dict) or saved.get("params") != live_names:
                return False
            for n in live_names:
                index[n] = len(index)
        if len(index) != sum(len(g["params"]) for g in groups):
            return False
        # exactly the trainable parameters carry state, as torch's path requires: it drops saved state of a
        # frozen parameter and refuses a trainable one without state; those cases take its path
        trainable = {n for n, p in params.items() if p.requires_grad and n in index}
        if set(saved_state) != trainable:
            return False
        self.optimizer.load_state_dict({
            "state": {index[n]: v for n, v in saved_state.items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in groups]})
        return True

    @staticmethod
    def _options(model: nn.Module, *, saving: bool, params: dict[str, nn.Parameter] | None = None):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        if not is_sharded_state(params if params is not None else dict(model.named_parameters())):
            return None
        return StateDictOptions(full_state_dict=True, cpu_offload=saving)
