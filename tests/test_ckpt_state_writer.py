"""Non-model states of a training entry: state.safetensors + state.json, bit- and type-identical round trips,
older state.pth entries still load, manifest hashes computed while writing, files get the user's umask."""
from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch
from torch import nn

import checkpoint
from checkpoint import CheckpointManager, OptimizerState
from checkpoint.states import STATE_JSON, STATE_PICKLE, STATE_TENSORS, flatten_states, read_states, unflatten_states
from checkpoint.storage import read_json, sha256_file
from _ckpt_testlib import bits


def _same(got, want, where="") -> None:
    """Equal structure, equal types (int stays int, tuple stays tuple), tensors bit for bit."""
    assert type(got) is type(want), (where, type(got), type(want))
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, where
        assert torch.equal(bits(got), bits(want.detach().cpu())), where
    elif isinstance(want, dict):
        assert list(got) == list(want), where
        for k in want:
            assert type(next(g for g in got if g == k)) is type(k), (where, k)
            _same(got[k], want[k], f"{where}/{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _same(g, w, f"{where}/{i}")
    elif isinstance(want, float) and math.isnan(want):
        assert math.isnan(got), where
    else:
        assert got == want and (not isinstance(want, float) or math.copysign(1, got) == math.copysign(1, want)), where


def _trained():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    opt = torch.optim.AdamW([{"params": list(model[0].parameters()) + list(model[3].parameters())},
                             {"params": model[1].parameters(), "weight_decay": 0.0}], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    for _ in range(3):
        model(torch.randn(2, 1, 8, 8)).square().mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


ODD_TRAINER = {"step": 3, "epoch": 0, "lr": 1e-3, "neg_zero": -0.0, "nan": float("nan"), "inf": float("-inf"),
               "flag": True, "none": None, "name": "run", "pair": (1, 2.5, "x"), "list": [1, [2, (3,)], {"k": 4}],
               "int_keys": {1: "a", 2: (3, 4)}, "tuple_keys": {(1, "a"): 5}, "__dunder__": 1,
               "one": 1, "one_float": 1.0, "big": 2 ** 70, "tensor_in_tuple": (torch.tensor([1.5, -0.0]),),
               "scalar": torch.tensor(7, dtype=torch.int64), "bf16": torch.ones(3, dtype=torch.bfloat16)}


def test_flatten_round_trip_keeps_types_and_bits():
    tensors: dict[str, torch.Tensor] = {}
    tree = flatten_states(ODD_TRAINER, tensors)
    text = json.dumps(tree, allow_nan=False)  # standard JSON: NaN/inf are tagged, not bare
    _same(unflatten_states(json.loads(text), tensors), ODD_TRAINER)


def test_whole_entry_round_trip_is_bit_identical_and_uses_no_pickle(tmp_path, monkeypatch):
    model, opt, sched = _trained()
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    want = {"optimizer": OptimizerState(model, opt).state_dict(), "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(), "trainer": ODD_TRAINER, "raw_optimizer": opt.state_dict()}

    def no_pickle(*a, **k):
        raise AssertionError("torch.save must not be used for plain states")

    monkeypatch.setattr(torch, "save", no_pickle)
    mgr = CheckpointManager(tmp_path)
    entry = mgr.save(3, {"model": model, "optimizer": OptimizerState(model, opt), "scheduler": sched,
                         "scaler": scaler, "trainer": ODD_TRAINER, "raw_optimizer": opt.state_dict()})
    monkeypatch.undo()
    names = sorted(p.name for p in entry.iterdir())
    assert names == ["manifest.json", "model.safetensors", STATE_JSON, STATE_TENSORS]
    got = read_states(entry)
    _same(got, want)
    assert sorted(got["raw_optimizer"]["state"]) == [0, 1, 2, 3, 4, 5]  # int keys stay int
    # and restoring puts it back into live objects
    model2, opt2, sched2 = _trained()
    for g in opt2.param_groups:
        g["lr"] = 9.0
    r = mgr.restore(None, {"model": model2, "optimizer": OptimizerState(model2, opt2), "scheduler": sched2,
                           "trainer": {}})
    assert r.restored == ["model", "optimizer", "scheduler", "trainer"]
    _same(opt2.state_dict(), opt.state_dict())
    _same(r.states["trainer"], ODD_TRAINER)


def test_manifest_hashes_computed_while_writing_match_the_files(tmp_path):
    model, opt, sched = _trained()
    entry = CheckpointManager(tmp_path).save(1, {"model": model, "optimizer": OptimizerState(model, opt)})
    files = read_json(entry / "manifest.json")["files"]
    assert sorted(files) == ["model.safetensors", STATE_JSON, STATE_TENSORS]
    for name, info in files.items():
        assert info["sha256"] == sha256_file(entry / name), name
        assert info["bytes"] == (entry / name).stat().st_size


def test_old_state_pth_entries_still_restore(tmp_path):
    model, opt, sched = _trained()
    mgr = CheckpointManager(tmp_path)
    entry = mgr.save(2, {"model": model, "optimizer": OptimizerState(model, opt), "scheduler": sched})
    states = read_states(entry)
    # rewrite the entry as the previous release did: one torch.save pickle, listed in the manifest
    manifest = read_json(entry / "manifest.json")
    for name in (STATE_JSON, STATE_TENSORS):
        (entry / name).unlink()
        del manifest["files"][name]
    torch.save(states, entry / STATE_PICKLE)
    manifest["files"][STATE_PICKLE] = {"bytes": (entry / STATE_PICKLE).stat().st_size,
                                       "sha256": sha256_file(entry / STATE_PICKLE)}
    (entry / "manifest.json").write_text(json.dumps(manifest))
    model2, opt2, sched2 = _trained()
    opt2.param_groups[0]["lr"] = 5.0
    mgr2 = CheckpointManager(tmp_path)
    r = mgr2.restore(None, {"model": model2, "optimizer": OptimizerState(model2, opt2), "scheduler": sched2})
    assert r.path == entry and r.restored == ["model", "optimizer", "scheduler"]
    _same(opt2.state_dict(), opt.state_dict())


def test_states_json_cannot_hold_fall_back_to_a_streamed_pickle(tmp_path):
    model, _, _ = _trained()
    odd = {"c128": torch.tensor([1 + 2j, -0.0j], dtype=torch.complex128)}  # safetensors has no complex128
    entry = CheckpointManager(tmp_path).save(1, {"model": model, "trainer": odd})
    assert (entry / STATE_PICKLE).is_file() and not (entry / STATE_JSON).exists()
    _same(read_states(entry), {"trainer": odd})


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_files_and_folders_get_the_users_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        entry = CheckpointManager(tmp_path / "ckpt").save(1, {"model": nn.Linear(2, 2), "trainer": {"x": 1}})
        single = checkpoint.save(nn.Linear(2, 2), tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    assert entry.stat().st_mode & 0o777 == 0o777 & ~mask
    for p in [*entry.iterdir(), single, tmp_path / "ckpt" / "latest"]:
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, p


def test_ema_and_other_mappings_use_the_fast_files_and_round_trip(tmp_path, monkeypatch):
    """An EMA (AveragedModel) state is an OrderedDict with the ``_metadata`` load_state_dict reads: it goes
    into state.safetensors + state.json (no pickle) and comes back an OrderedDict, in order, with _metadata."""
    from collections import OrderedDict, defaultdict

    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model, _, _ = _trained()
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    ema.update_parameters(model)
    ema_sd = ema.state_dict()
    assert type(ema_sd) is OrderedDict and ema_sd._metadata  # what torch hands the manager
    odd = {"od": OrderedDict([("b", 1), ("a", (2, torch.tensor([3.0])))]), "od_int": OrderedDict([(2, "x"), (1, "y")]),
           "dd": defaultdict(list, {"k": [1]})}

    def no_pickle(*a, **k):
        raise AssertionError("torch.save must not be used for an EMA state")

    monkeypatch.setattr(torch, "save", no_pickle)
    entry = CheckpointManager(tmp_path).save(1, {"model": model, "ema": ema_sd, "trainer": odd})
    monkeypatch.undo()
    assert sorted(p.name for p in entry.iterdir()) == ["manifest.json", "model.safetensors", STATE_JSON,
                                                       STATE_TENSORS]
    got = read_states(entry)
    _same(got["ema"], ema_sd)
    assert got["ema"]._metadata == ema_sd._metadata
    _same(got["trainer"]["od"], odd["od"])
    _same(got["trainer"]["od_int"], odd["od_int"])
    assert type(got["trainer"]["dd"]) is dict and got["trainer"]["dd"] == {"k": [1]}  # JSON cannot name the factory
    fresh = AveragedModel(_trained()[0], use_buffers=True)
    fresh.load_state_dict(got["ema"])
    _same(fresh.state_dict(), ema_sd)


def test_optimizer_state_loads_by_index_when_groups_match_and_through_dcp_otherwise(monkeypatch):
    """The restore fast path (no DCP name resolution) gives exactly DCP's result; regrouped params fall back."""
    import torch.distributed.checkpoint.state_dict as dcp_sd

    model, opt, _ = _trained()
    saved = OptimizerState(model, opt).state_dict()
    model_dcp, opt_dcp, _ = _trained()
    for g in opt_dcp.param_groups:
        g["lr"] = 7.0
    dcp_sd.set_optimizer_state_dict(model_dcp, opt_dcp, saved)

    def no_dcp(*a, **k):
        raise AssertionError("matching groups must not need DCP's set_optimizer_state_dict")

    model2, opt2, _ = _trained()
    for g in opt2.param_groups:
        g["lr"] = 7.0
    monkeypatch.setattr(dcp_sd, "set_optimizer_state_dict", no_dcp)
    OptimizerState(model2, opt2).load_state_dict(saved)
    monkeypatch.undo()
    _same(opt2.state_dict(), opt_dcp.state_dict())
    _same(opt2.state_dict(), opt.state_dict())
    # one group instead of two: names no longer match group by group, DCP regroups by name
    model3, _, _ = _trained()
    opt3 = torch.optim.AdamW(model3.parameters(), lr=1.0)
    calls = []
    real = dcp_sd.set_optimizer_state_dict
    monkeypatch.setattr(dcp_sd, "set_optimizer_state_dict", lambda *a, **k: calls.append(1) or real(*a, **k))
    OptimizerState(model3, opt3).load_state_dict(saved)
    assert calls == [1]
    live = dict(model.named_parameters())
    for n, p in model3.named_parameters():
        assert torch.equal(opt3.state[p]["exp_avg"], opt.state[live[n]]["exp_avg"]), n


def test_optimizer_fast_load_refuses_what_torchs_path_refuses():
    # saved with a frozen layer (no AdamW state for it), resumed with it trainable: torch's
    # set_optimizer_state_dict refuses the missing state; the index fast path must not load it silently
    import warnings

    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    warnings.simplefilter("ignore")  # DCP's "no process group: one process" note
    torch.manual_seed(0)
    frozen = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    frozen[1].weight.requires_grad_(False)
    opt = torch.optim.AdamW(frozen.parameters(), lr=0.1)
    frozen(torch.randn(4, 2)).sum().backward()
    opt.step()
    saved = OptimizerState(frozen, opt).state_dict()
    assert "1.weight" not in saved["state"]

    def fresh():
        m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        return m, torch.optim.AdamW(m.parameters(), lr=0.1)

    with pytest.raises(RuntimeError, match="Missing optimizer state for parameter '1.weight'"):
        set_optimizer_state_dict(*fresh(), saved)
    with pytest.raises(RuntimeError, match="Missing optimizer state for parameter '1.weight'"):
        OptimizerState(*fresh()).load_state_dict(saved)


def test_a_damaged_state_json_is_refused_in_one_line(tmp_path):
    model, opt, sched = _trained()
    entry = CheckpointManager(tmp_path).save(3, {"model": model, "optimizer": OptimizerState(model, opt)})
    doc = read_json(entry / STATE_JSON)
    doc["states"]["optimizer"]["state"]["0.weight"]["exp_avg"] = {"__tensor__": "not/in/the/file"}
    (entry / STATE_JSON).write_text(json.dumps(doc))
    with pytest.raises(checkpoint.CheckpointError, match="names tensor 'not/in/the/file'.*damaged"):
        read_states(entry)
    (entry / STATE_JSON).write_text('{"format_version": 1, "states": {')
    with pytest.raises(checkpoint.CheckpointError, match="unreadable JSON"):
        read_states(entry)
    (entry / STATE_JSON).write_text('{"format_version": 99, "states": {}}')
    with pytest.raises(checkpoint.CheckpointError, match="unknown layout"):
        read_states(entry)
