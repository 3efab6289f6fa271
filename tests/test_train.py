"""train.py end to end on a tiny IDX dataset: artifacts, resume, DDP equivalence, LR, weight decay."""
import json
import math
import os
import subprocess
import sys

import pytest
import timm
import torch

import models  # noqa: F401  (registers the models)
from helpers import ROOT, run_train, tiny_overrides
from engine.config import OptimConfig
from engine.logger import read_jsonl
from engine.errors import UserError
from engine.optim import LRSchedule, adamw_impl, build_optimizer, build_schedule, param_groups


def tb_scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def test_two_epoch_run_writes_every_artifact(fake_fmnist, tmp_path, monkeypatch):
    import train as train_script

    modes = []
    monkeypatch.setattr(train_script, "apply_allocator_mode", lambda mode, device_type: modes.append(mode) or True)
    out = str(tmp_path / "run")
    run_train(tiny_overrides(fake_fmnist, out, **{"train.ema": "true", "train.ema_decay": 0.9,
                                                  "train.plot_modulators": "true"}))
    for name in ("config.yaml", "log.jsonl", "summary.csv", "last.pth", "best.pth"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert any(f.startswith("events.") for f in os.listdir(os.path.join(out, "tensorboard")))
    assert any(f.startswith("checkpoint-epoch") for f in os.listdir(out))
    rows = read_jsonl(os.path.join(out, "log.jsonl"))
    assert [r["epoch"] for r in rows] == [0, 1]
    for key in ("train_loss", "lr", "val_loss", "val_top1", "val_top5", "val_top1_ema"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert rows[-1]["val_images"] == 37  # every test image counted once
    assert modes == ["tuned"]  # on CPU, glibc is told to keep freed memory (engine.cpu_alloc)
    with open(os.path.join(out, "summary.csv")) as f:
        assert len(f.read().strip().splitlines()) == 3
    ckpt = torch.load(os.path.join(out, "last.pth"), weights_only=True)
    assert {"model", "model_ema", "optimizer", "scaler", "epoch", "step", "best", "rng", "config",
            "format_version"} <= set(ckpt)
    assert ckpt["epoch"] == 1 and ckpt["step"] == 2 * (96 // 16)
    resolved = open(os.path.join(out, "config.yaml")).read()
    for key in ("global_batch", "effective_lr", "world_size", "git_sha", "torch"):
        assert key in resolved
    # TensorBoard: per-step loss and lr, eval metrics, and every modulator parameter
    assert len(tb_scalars(out, "train/loss")) == ckpt["step"]
    assert tb_scalars(out, "epoch/val_top1_ema")
    assert tb_scalars(out, "modulators/out_modulator/ts[3]")
    assert tb_scalars(out, "modulators/blocks.1.attn.normalizer.modulator/ranges[0]")


def test_resume_reproduces_uninterrupted_run(fake_fmnist, tmp_path):
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    extra = {"train.ema": "true", "train.ema_decay": 0.9, "model.drop_path_rate": 0.1}
    run_train(tiny_overrides(fake_fmnist, full, **extra))
    run_train(tiny_overrides(fake_fmnist, split, **extra, **{"train.stop_after_epochs": 1}))
    assert [r["epoch"] for r in read_jsonl(os.path.join(split, "log.jsonl"))] == [0]
    run_train(tiny_overrides(fake_fmnist, split, **extra))  # same command again: resumes
    a = torch.load(os.path.join(full, "last.pth"), weights_only=True)
    b = torch.load(os.path.join(split, "last.pth"), weights_only=True)
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"] == 1
    for key in ("model", "model_ema"):
        for name, t in a[key].items():
            torch.testing.assert_close(b[key][name], t, rtol=0, atol=1e-6, msg=f"{key}.{name}")
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=1e-6)
    assert [g["lr"] for g in a["optimizer"]["param_groups"]] == [g["lr"] for g in b["optimizer"]["param_groups"]]
    la, lb = read_jsonl(os.path.join(full, "log.jsonl")), read_jsonl(os.path.join(split, "log.jsonl"))
    assert [r["lr"] for r in la] == [r["lr"] for r in lb]
    assert [r["val_top1"] for r in la] == [r["val_top1"] for r in lb]


def test_resume_may_switch_the_adamw_implementation(fake_fmnist, tmp_path):
    """optim.impl is a throughput knob: a run started with the for-loop AdamW resumes fused
    (the run dir's config differs only there) and continues from the saved moments."""
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    run_train(tiny_overrides(fake_fmnist, full, **{"optim.impl": "loop"}))
    run_train(tiny_overrides(fake_fmnist, split, **{"optim.impl": "loop", "train.stop_after_epochs": 1}))
    run_train(tiny_overrides(fake_fmnist, split, **{"optim.impl": "fused"}))
    assert [r["epoch"] for r in read_jsonl(os.path.join(split, "log.jsonl"))] == [0, 1]
    a = torch.load(os.path.join(full, "last.pth"), weights_only=True)
    b = torch.load(os.path.join(split, "last.pth"), weights_only=True)
    assert a["step"] == b["step"] and b["optimizer"]["param_groups"][0]["fused"] is True
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert float(sb["step"]) == float(sa["step"]) == a["step"]
        torch.testing.assert_close(sb["exp_avg_sq"], sa["exp_avg_sq"], rtol=1e-3, atol=1e-9)  # rounding only
    for name, t in a["model"].items():
        torch.testing.assert_close(b["model"][name], t, rtol=1e-3, atol=1e-4, msg=name)


def test_ddp_two_processes_match_one_process(fake_fmnist, tmp_path):
    """Two gloo processes with batch 8 each against one process with batch 16, same data order."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    common = {"model.drop_path_rate": 0.0, "data.train_transform": "none"}
    run_train(tiny_overrides(fake_fmnist, one, **common, **{"data.batch_size": 16}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "quickstart.yaml"),
           *tiny_overrides(fake_fmnist, two, **common, **{"data.batch_size": 8})]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # tolerance: float32 reductions happen in a different order (per-rank means, then all-reduce)
    loss_one, loss_two = tb_scalars(one, "train/loss"), tb_scalars(two, "train/loss")
    assert len(loss_one) == len(loss_two) == 12
    for (s1, v1), (s2, v2) in zip(loss_one, loss_two):
        assert s1 == s2 and abs(v1 - v2) <= 1e-4 * max(1.0, abs(v1)), (s1, v1, v2)
    a = torch.load(os.path.join(one, "last.pth"), weights_only=True)["model"]
    b = torch.load(os.path.join(two, "last.pth"), weights_only=True)["model"]
    for name, t in a.items():
        torch.testing.assert_close(b[name], t, rtol=1e-4, atol=1e-5, msg=name)
    ra, rb = read_jsonl(os.path.join(one, "log.jsonl")), read_jsonl(os.path.join(two, "log.jsonl"))
    assert [r["val_images"] for r in rb] == [37, 37]
    assert [r["val_top1"] for r in ra] == [r["val_top1"] for r in rb]


def test_lr_schedule_matches_formula():
    s = LRSchedule(base_lr=1e-3, total_steps=1000, warmup_steps=100, warmup_lr=1e-6, min_lr=1e-5)
    assert s(0) == pytest.approx(1e-6)
    assert s(50) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5)
    assert s(100) == pytest.approx(1e-3)
    assert s(550) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 0.5)))
    assert s(1000) == pytest.approx(1e-5)
    cfg = OptimConfig(warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5)
    deit = build_schedule(cfg, base_lr=1e-3, epochs=300, steps_per_epoch=1251)
    assert deit.warmup_steps == 5 * 1251 and deit.total_steps == 300 * 1251
    assert deit(deit.total_steps) == pytest.approx(1e-5)


def test_no_modulator_or_1d_param_is_weight_decayed():
    model = timm.create_model("deit_tiny_multimax_patch16_224", img_size=32, patch_size=8, depth=2)
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    mods = [n for n, _ in model.named_parameters() if ".modulator." in n or n.startswith("out_modulator.")]
    assert len(mods) == 6 and set(mods) <= set(no_decay["param_names"])
    assert "pos_embed" in no_decay["param_names"]
    assert all(p.ndim >= 2 for p in decay["params"])
    assert "blocks.0.attn.qkv.weight" in decay["param_names"]


def test_adamw_impls_take_the_same_steps():
    """optim.impl changes how torch runs AdamW, not the update: fused (auto on CPU), foreach and
    the for-loop give the same weights after a few steps with both parameter groups."""
    torch.manual_seed(0)
    ref = timm.create_model("deit_tiny_multimax_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    weights = {}
    for impl in ("loop", "foreach", "fused", "auto"):
        model = timm.create_model("deit_tiny_multimax_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10)
        model.load_state_dict(ref.state_dict())
        opt = build_optimizer(model, OptimConfig(impl=impl), lr=1e-2)
        assert opt.defaults["fused"] is (True if impl in ("fused", "auto") else None)
        assert opt.defaults["foreach"] is {"loop": False, "foreach": True}.get(impl)
        for _ in range(3):
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        weights[impl] = torch.cat([p.detach().flatten() for p in model.parameters()])
    moved = (weights["loop"] - torch.cat([p.detach().flatten() for p in ref.parameters()])).abs().max()
    assert moved > 1e-3  # the steps changed the weights
    for impl in ("foreach", "fused", "auto"):
        torch.testing.assert_close(weights[impl], weights["loop"], rtol=1e-4, atol=1e-5)  # steps are ~1e-2


def test_adamw_impl_errors_name_the_key():
    assert adamw_impl("auto", [torch.zeros(2, device="meta")]) == "default"  # no fused kernel: torch's choice
    with pytest.raises(UserError, match="optim.impl.*meta"):
        adamw_impl("fused", [torch.zeros(2, device="meta")])
    with pytest.raises(UserError, match="optim.impl"):
        adamw_impl("fast", [torch.zeros(2)])
