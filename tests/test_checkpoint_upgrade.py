"""Resuming a training checkpoint written before the model fused q/k/v and gate/up: the rewrite
is exact (weights and AdamW moments), for every family, and one cut short is recovered."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from r3.checkpoint import load
from r3.model import split_for_checkpoint
from r3.rundir import _legacy_layout, _recover_upgrades, upgrade_fused_layout


def _parts_of(name):
    for fused, parts in (("qkv_proj", ("q_proj", "k_proj", "v_proj")), ("gate_up_proj", ("gate_proj", "up_proj"))):
        if fused in name:
            return [name.replace(fused, part) for part in parts]
    return [name]


def _trained(path):
    model, _ = load(path, tokenizer=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(tokens).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _write_legacy(path, model, opt):
    """The checkpoint as r3 wrote it when every family held q/k/v and gate/up apart."""
    cfg = model.config
    msd, osd = get_state_dict(model, opt)
    legacy_model = split_for_checkpoint(cfg, dict(msd), always=True)
    state = {}
    for name, st in osd["state"].items():
        moments = {k: split_for_checkpoint(cfg, {name: v}, always=True) for k, v in st.items() if k != "step"}
        for part in moments["exp_avg"]:
            state[part] = {"step": st["step"].clone(), **{k: m[part] for k, m in moments.items()}}
    groups = [{**g, "params": [p for n in g["params"] for p in _parts_of(n)]} for g in osd["param_groups"]]
    dcp.save({"model": legacy_model, "optim": {"state": state, "param_groups": groups}}, checkpoint_id=str(path),
             no_dist=True)
    (path / "trainer_state.json").write_text(json.dumps({"step": 2}))


@pytest.mark.parametrize("kind", ["qwen2", "phi3"])  # q/k/v biases; a family whose own checkpoints fuse
def test_upgrade_of_a_separate_projection_checkpoint_is_exact(tiny_dirs, tmp_path, kind):
    model, opt = _trained(tiny_dirs[kind][0])
    path = tmp_path / "checkpoints" / "step_000002"
    _write_legacy(path, model, opt)
    assert _legacy_layout(path)
    upgrade_fused_layout(path, model.config)
    assert not _legacy_layout(path) and json.loads((path / "trainer_state.json").read_text()) == {"step": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["step_000002"]  # nothing left beside it

    fresh, fresh_opt = _trained(tiny_dirs[kind][0])
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    msd, osd = get_state_dict(fresh, fresh_opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for (name, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), name
        sa, sb = opt.state[a], fresh_opt.state[b]
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"]), name
        assert float(sa["step"]) == float(sb["step"]) == 2.0


def test_an_upgrade_cut_short_is_recovered(tiny_dirs, tmp_path):
    model, opt = _trained(tiny_dirs["llama"][0])
    root = tmp_path / "checkpoints"
    path = root / "step_000002"
    _write_legacy(path, model, opt)
    dcp_to_torch_save(str(path), str(root / ".step_000002.whole.pt"))
    # cut short between the two renames: the original moved aside, the rewrite not yet in place
    shutil.copytree(path, root / ".step_000002.fused.tmp")
    os.replace(path, root / ".step_000002.unfused")
    _recover_upgrades(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step_000002"] and _legacy_layout(path)
    # cut short after them: the rewrite is in place, the original (legacy, so a restore shows) is dropped
    shutil.copytree(path, root / ".step_000002.legacy")
    upgrade_fused_layout(path, model.config)
    os.replace(root / ".step_000002.legacy", root / ".step_000002.unfused")
    assert _legacy_layout(root / ".step_000002.unfused") and not _legacy_layout(path)
    _recover_upgrades(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step_000002"] and not _legacy_layout(path)
