"""train.py end to end on a tiny IDX dataset (artifacts, resume, DDP equivalence, LR, weight decay,
fp16), its command line, and the training step: host syncs, non-finite steps, EMA, evaluation."""
import math
import os
import subprocess
import sys

import pytest
import timm
import torch
import torch.distributed as tdist
import yaml

import models  # noqa: F401  (registers the models)
from helpers import ROOT, assert_exact_resume, run_train, signal_at_call, tiny_overrides
from engine.config import RETIRED_KEYS, OptimConfig, TrainConfig, config_from_yaml_text, load_config
from engine.logger import read_jsonl
from engine.optim import LRSchedule, build_optimizer, build_schedule, param_groups


def tb_scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def test_two_epoch_run_writes_every_artifact(fake_fmnist, tmp_path):
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
    with open(os.path.join(out, "summary.csv")) as f:
        assert len(f.read().strip().splitlines()) == 3
    ckpt = torch.load(os.path.join(out, "last.pth"), weights_only=True)
    assert {"model", "model_ema", "optimizer", "scaler", "epoch", "step", "best", "rng", "config",
            "format_version", "epoch_step", "epoch_sums", "consecutive_skips"} <= set(ckpt)
    assert ckpt["epoch"] == 1 and ckpt["step"] == 2 * (96 // 16)
    resolved = open(os.path.join(out, "config.yaml")).read()
    for key in ("global_batch", "effective_lr", "world_size", "git_sha", "torch"):
        assert key in resolved
    # TensorBoard: per-step loss and lr, eval metrics, and every modulator parameter
    assert len(tb_scalars(out, "train/loss")) == ckpt["step"]
    assert tb_scalars(out, "epoch/val_top1_ema")
    assert tb_scalars(out, "modulators/out_modulator/ts[3]")
    assert tb_scalars(out, "modulators/blocks.1.attn.normalizer.modulator/ranges[0]")


def test_tensorboard_off_writes_no_event_files(fake_fmnist, tmp_path):
    out = str(tmp_path / "run")
    run_train(tiny_overrides(fake_fmnist, out, **{"train.epochs": 1, "train.tensorboard": "false"}))
    assert not os.path.exists(os.path.join(out, "tensorboard"))
    assert [r["epoch"] for r in read_jsonl(os.path.join(out, "log.jsonl"))] == [0]


def test_resume_reproduces_uninterrupted_run(fake_fmnist, tmp_path):
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    extra = {"train.ema": "true", "train.ema_decay": 0.9, "model.drop_path_rate": 0.1}
    run_train(tiny_overrides(fake_fmnist, full, **extra))
    run_train(tiny_overrides(fake_fmnist, split, **extra, **{"train.stop_after_epochs": 1}), rc=75)
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


def test_a_resume_at_90_percent_of_an_epoch_decodes_only_the_rest_and_ends_as_uninterrupted(
        tmp_path, monkeypatch, capsys):
    """A stop signal late in an epoch, with train.log_every far beyond the epoch: the run stops the
    step after (not at a log step), saves mid-epoch at 90% of it; the resumed job's loader starts at
    that batch and decodes only the images after it, and the run ends with the weights and log rows
    of an uninterrupted one, with augmentation, mixup, stochastic depth and EMA all drawing random
    numbers."""
    from conftest import write_idx_dataset
    from data.datasets import FashionMNIST

    data = write_idx_dataset(str(tmp_path / "data"), n_train=160, n_test=20)   # batch 4: 40 steps an epoch
    extra = {"data.batch_size": 4, "train.log_every": 1000, "train.ema": "true", "train.ema_decay": 0.9,
             "model.drop_path_rate": 0.1, "data.reprob": 0.25, "data.mixup": 0.8, "data.cutmix": 1.0}
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    run_train(tiny_overrides(data, full, **extra))
    decoded, real_getitem = [], FashionMNIST.__getitem__

    def getitem(self, index):
        if len(self) == 160:
            decoded.append(index)
        return real_getitem(self, index)

    monkeypatch.setattr(FashionMNIST, "__getitem__", getitem)
    with monkeypatch.context() as m:
        signal_at_call(m, 35)
        run_train(tiny_overrides(data, split, **extra), rc=75)
    assert "SIGTERM: saved" in capsys.readouterr().out
    ckpt = torch.load(os.path.join(split, "last.pth"), weights_only=True)
    assert ckpt["epoch"] == -1 and ckpt["epoch_step"] == 36   # the step after the signal's
    decoded.clear()
    run_train(tiny_overrides(data, split, **extra))
    assert len(decoded) == (40 - 36) * 4 + 40 * 4   # the epoch's last 4 batches, then all of epoch 1
    assert_exact_resume(full, split)


# what an older version wrote for the keys the schema no longer has
OLD_KEYS = {"optim.impl": "loop", "train.cpu_malloc": "tuned"}


def _with_old_keys(data):
    for dotted, value in OLD_KEYS.items():
        section, key = dotted.split(".")
        data[section][key] = value
    return data


def test_a_run_of_an_older_version_resumes(fake_fmnist, tmp_path):
    """A run directory written by an older version resumes: its config.yaml and checkpoints set keys
    the schema no longer has (engine.config.RETIRED_KEYS) and its AdamW state carries the for-loop
    implementation's flags (a choice then). The resumed run goes on fused from the saved moments,
    exactly as the uninterrupted run, and the old checkpoints' stored config still loads (as
    eval.py reads it); what the resumed run writes has the retired keys no more."""
    assert set(OLD_KEYS) == set(RETIRED_KEYS)
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    run_train(tiny_overrides(fake_fmnist, full))
    run_train(tiny_overrides(fake_fmnist, split, **{"train.stop_after_epochs": 1}), rc=75)
    cfg_path = os.path.join(split, "config.yaml")
    with open(cfg_path) as f:
        old = _with_old_keys(yaml.safe_load(f))
    with open(cfg_path, "w") as f:
        yaml.safe_dump(old, f, sort_keys=False)
    for name in (n for n in os.listdir(split) if n.endswith(".pth")):
        ckpt = torch.load(os.path.join(split, name), weights_only=True)
        stored = config_from_yaml_text(ckpt["config"])
        ckpt["config"] = yaml.safe_dump(_with_old_keys(yaml.safe_load(ckpt["config"])), sort_keys=False)
        assert config_from_yaml_text(ckpt["config"]) == stored
        for group in ckpt["optimizer"]["param_groups"]:
            group.update(fused=None, foreach=False)
        torch.save(ckpt, os.path.join(split, name))
    run_train(tiny_overrides(fake_fmnist, split))
    assert [r["epoch"] for r in read_jsonl(os.path.join(split, "log.jsonl"))] == [0, 1]
    a = torch.load(os.path.join(full, "last.pth"), weights_only=True)
    b = torch.load(os.path.join(split, "last.pth"), weights_only=True)
    assert a["step"] == b["step"] and b["optimizer"]["param_groups"][0]["fused"] is True
    with open(cfg_path) as f:
        written = yaml.safe_load(f)
    for section, key in (dotted.split(".") for dotted in RETIRED_KEYS):
        assert key not in written[section] and key not in yaml.safe_load(b["config"])[section]
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert float(sb["step"]) == float(sa["step"]) == a["step"]
        torch.testing.assert_close(sb["exp_avg_sq"], sa["exp_avg_sq"], rtol=0, atol=1e-9)
    for name, t in a["model"].items():
        torch.testing.assert_close(b["model"][name], t, rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_ddp_two_processes_match_one_process(fake_fmnist, tmp_path, compiled):
    """Two gloo processes with batch 8 each against one process with batch 16, same data order;
    also with train.compile=true, which compiles the DDP-wrapped model: Dynamo's DDPOptimizer
    splits the graph at DDP's buckets with the attention's autograd Function (a higher-order op)
    in it, which torch before 2.6 refused (requirements.txt's floor is above)."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    # 128 wide, the weights (1.6 MB) overflow DDP's first gradient bucket (1 MiB): compiled, DDP's
    # graph optimizer splits the graph there, as it splits a DeiT's
    common = {"model.drop_path_rate": 0.0, "data.train_transform": "none", "model.kwargs.embed_dim": 128,
              "train.compile": str(compiled).lower()}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    train_py = [os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "quickstart.yaml")]
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    # one process in a child too: a compiled run would leave Dynamo's caches in this one
    for out, launch, batch in ((one, [], 16), (two, torchrun, 8)):
        args = tiny_overrides(fake_fmnist, out, **common, **{"data.batch_size": batch})
        proc = subprocess.run([sys.executable, *launch, *train_py, *args], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
    # tolerance: float32 reductions happen in a different order (per-rank means, then all-reduce;
    # compiled, Inductor's fused kernels reorder them too)
    loss_one, loss_two = tb_scalars(one, "train/loss"), tb_scalars(two, "train/loss")
    assert len(loss_one) == len(loss_two) == 12
    for (s1, v1), (s2, v2) in zip(loss_one, loss_two):
        assert s1 == s2 and abs(v1 - v2) <= 1e-4 * max(1.0, abs(v1)), (s1, v1, v2)
    a = torch.load(os.path.join(one, "last.pth"), weights_only=True)["model"]
    b = torch.load(os.path.join(two, "last.pth"), weights_only=True)["model"]
    assert sum(t.numel() * t.element_size() for t in a.values()) > tdist._DEFAULT_FIRST_BUCKET_BYTES
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


def test_adamw_is_fused_where_torch_has_the_kernel_and_takes_the_for_loops_steps():
    """build_optimizer's fused AdamW gives the weights torch's for-loop AdamW gives over the same
    parameter groups after a few steps; parameters without a fused kernel get torch's default."""
    torch.manual_seed(0)
    ref = timm.create_model("deit_tiny_multimax_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    weights = {}
    for impl in ("loop", "ours"):
        model = timm.create_model("deit_tiny_multimax_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10)
        model.load_state_dict(ref.state_dict())
        opt = build_optimizer(model, OptimConfig(), lr=1e-2)
        if impl == "loop":
            opt = torch.optim.AdamW(param_groups(model, OptimConfig().weight_decay), lr=1e-2, foreach=False)
        assert opt.defaults["fused"] is (True if impl == "ours" else None)
        for _ in range(3):
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        weights[impl] = torch.cat([p.detach().flatten() for p in model.parameters()])
    moved = (weights["loop"] - torch.cat([p.detach().flatten() for p in ref.parameters()])).abs().max()
    assert moved > 1e-3  # the steps changed the weights
    torch.testing.assert_close(weights["ours"], weights["loop"], rtol=1e-4, atol=1e-5)  # steps are ~1e-2
    with torch.device("meta"):
        meta = timm.create_model("vit_micro_multimax_patch7_28", depth=1)
    assert build_optimizer(meta, OptimConfig(), lr=1e-3).defaults["fused"] is None  # no fused kernel on meta


# ------------------------------------------------------------------ the command line

def test_help_is_useful_and_bare_train_py_is_the_quickstart(tmp_path, monkeypatch, capsys):
    """The help says where the keys are documented; --print-config shows each key's help and
    choices; a bare ``python train.py`` resolves to exactly the quickstart config."""
    import train

    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    help_text = capsys.readouterr().out
    for needle in ("engine/config.py", "--print-config", "configs/quickstart.yaml", "75", "train.resume=none"):
        assert needle in help_text, needle

    def printed(*args):
        assert train.main(["--print-config", *args]) == 0
        return capsys.readouterr().out

    monkeypatch.chdir(tmp_path)
    bare = printed()
    assert bare == printed("--config", os.path.join(ROOT, "configs", "quickstart.yaml"))
    assert "name: vit_micro_multimax_patch7_28  # a timm model name" in bare and "output_dir: runs/quickstart" in bare
    assert "attn_backend: auto  # attention kernel" in bare and "(auto | sdpa | explicit | flex | chunked)" in bare
    assert "lr: 0.0123" in printed("optim.lr=0.0123")


# ------------------------------------------------------------------ the training step

def test_epoch_steps_are_read_off_the_train_keys():
    """An epoch's optimizer steps: train.accum_steps batches each, at most train.max_steps_per_epoch."""
    from engine.loop import epoch_steps

    cfg = load_config(None, ["train.accum_steps=2", "train.max_steps_per_epoch=3"])
    assert epoch_steps(cfg.train, 10) == 3 and epoch_steps(cfg.train, 5) == 2
    assert epoch_steps(TrainConfig(), 10) == 10


def _tiny_trainer(train, optim=None, amp_scaler=None, for_loop_adamw=False, ema_decay=0.9, criterion=None):
    from engine.distributed import DistInfo
    from engine.loop import Trainer, TrainState, build_criterion
    from engine.model import EMA

    torch.manual_seed(0)
    model = timm.create_model("vit_micro_multimax_patch7_28", num_classes=10, in_chans=1, embed_dim=32, depth=2,
                              num_heads=2)
    optimizer = (torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3, foreach=False) if for_loop_adamw
                 else build_optimizer(model, OptimConfig(), lr=1e-3))
    info = DistInfo(0, 1, 0, torch.device("cpu"), True, "none", False)
    ema = EMA(model, ema_decay) if ema_decay else None
    return Trainer(model=model, optimizer=optimizer, criterion=criterion or build_criterion(False, 0.1),
                   lr_schedule=lambda step: 1e-3, state=TrainState(), info=info, train=train,
                   optim=optim or OptimConfig(), scaler=amp_scaler, ema=ema)


def _batches(n, batch=4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 1, 28, 28, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(n)]


HOST_SYNCS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


def _count_host_syncs(monkeypatch, trainer):
    """Patch every Tensor method that reads a value back to the host (and torch.cuda.synchronize):
    each call is recorded with the number of optimizer steps done at that moment."""
    seen = []
    for name in HOST_SYNCS:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *a, _original=original, _name=name, **k):
            seen.append((trainer.state.step, _name))
            return _original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, wrapper)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: seen.append((trainer.state.step, "synchronize")))
    return seen


@pytest.mark.parametrize("variant", ["fused", "fp16-scaler", "accum-clip-ema"])
def test_a_training_step_reads_nothing_back_between_log_steps(monkeypatch, variant):
    """The host reads the device once per log step (train.log_every) and never in between: loss,
    grad norm, the skip decision and the EMA stay on the device. The one thing each step hands the
    host is the ranks' stop votes, which the device copies to host memory after the step's
    all-reduce; the host takes them one step late (on a GPU it waits for the previous step's
    event, never for the step being run)."""
    from engine.loop import _Votes

    accum = 2 if variant == "accum-clip-ema" else 1
    amp = "fp16" if variant == "fp16-scaler" else "none"
    scaler = torch.amp.GradScaler("cpu") if variant == "fp16-scaler" else None
    trainer = _tiny_trainer(TrainConfig(log_every=4, accum_steps=accum, amp=amp),
                            OptimConfig(clip_grad=1.0 if accum == 2 else None), scaler, ema_decay=0.9 if accum == 2 else 0)
    exchanges, real_exchange = [], _Votes.exchange

    def exchange(self, votes):
        exchanges.append((trainer.state.step, self.posted))
        return real_exchange(self, votes)

    seen = _count_host_syncs(monkeypatch, trainer)
    monkeypatch.setattr(_Votes, "exchange", exchange)
    result = trainer.train_one_epoch(_batches(12 * accum), epoch=0)
    monkeypatch.undo()
    assert result.stats["skipped_steps"] == 0 and math.isfinite(result.stats["train_loss"])
    assert [step for step, _ in seen] == [4, 8, 12], seen   # one read per log step, none on the steps between
    # every step posts its votes; from the second on, the previous step's are read
    assert exchanges == [(k, k > 1) for k in range(1, 13)]


def test_unfused_adamw_is_the_documented_exception_that_reads_every_step(monkeypatch):
    """The control that shows the counter sees syncs: an AdamW without the fused kernel (torch's
    for-loop here; parameters on a device torch has no fused kernel for) cannot skip a step on the
    device, so the loop reads the step's flag back each step."""
    trainer = _tiny_trainer(TrainConfig(log_every=4), for_loop_adamw=True, ema_decay=0)
    seen = _count_host_syncs(monkeypatch, trainer)
    trainer.train_one_epoch(_batches(8), epoch=0)
    monkeypatch.undo()
    assert sorted({step for step, name in seen if name == "__bool__"}) == list(range(8))


def test_fp16_overflow_is_a_skipped_step_and_a_nan_loss_still_stops():
    """A GradScaler overflow (forced: a scale of 2**127 overflows float32) skips the step, lowers the
    scale and counts as skipped; training goes on under train.nonfinite=stop. A NaN loss still stops."""
    from engine.loop import NonFiniteLossError, build_criterion

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127, backoff_factor=2.0 ** -117)
    trainer = _tiny_trainer(TrainConfig(log_every=1, amp="fp16", nonfinite="stop"), amp_scaler=scaler)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    result = trainer.train_one_epoch(_batches(4), epoch=0)
    assert result.stats["skipped_steps"] == 1 and scaler.get_scale() <= 2.0 ** 10
    assert trainer.state.step == 4 and trainer.state.consecutive_skips == 0
    adam_steps = {float(s["step"]) for s in trainer.optimizer.state.values()}
    assert adam_steps == {3.0}                           # the skipped update did not count
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))

    calls = []
    plain = build_criterion(False, 0.1)

    def nan_on_third(logits, target):
        calls.append(1)
        loss = plain(logits, target)
        return loss * float("nan") if len(calls) == 3 else loss

    trainer = _tiny_trainer(TrainConfig(log_every=1, amp="fp16", nonfinite="stop"),
                            amp_scaler=torch.amp.GradScaler("cpu"), criterion=nan_on_third)
    with pytest.raises(NonFiniteLossError, match="epoch 0, step 3"):
        trainer.train_one_epoch(_batches(6), epoch=0)
    assert trainer.state.step == 3


def test_nonfinite_skip_leaves_weights_and_ema_untouched_and_gives_up_after_a_run_of_skips():
    from engine.loop import NonFiniteLossError, build_criterion

    plain, calls = build_criterion(False, 0.1), []

    def nan_from_third(logits, target):
        calls.append(1)
        return plain(logits, target) * (float("nan") if len(calls) >= 3 else 1.0)

    trainer = _tiny_trainer(TrainConfig(log_every=1, nonfinite="skip", max_consecutive_skips=3),
                            criterion=nan_from_third)
    batches = _batches(8)
    trainer.train_one_epoch(batches[:2], epoch=0)
    weights = [p.detach().clone() for p in trainer.model.parameters()]
    ema = [t.clone() for t in trainer.ema.state_dict().values()]
    with pytest.raises(NonFiniteLossError, match="3 optimizer steps in a row were skipped"):
        trainer.train_one_epoch(batches[2:], epoch=1)
    assert all(torch.equal(a, b) for a, b in zip(weights, trainer.model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(ema, trainer.ema.state_dict().values()))


def test_ema_update_and_skip():
    from engine.model import EMA

    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.75)
    start = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model, torch.tensor(False))
    assert all(torch.equal(start[k], v) for k, v in ema.state_dict().items())
    ema.update(model, torch.tensor(True))
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(v, start[k] + 0.25 * (model.state_dict()[k] - start[k]))


def test_evaluate_model_and_ema_in_one_pass_over_the_data():
    from engine.distributed import DistInfo
    from engine.loop import evaluate

    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 5), torch.nn.Linear(8, 5)
    data = [(torch.randn(6, 8), torch.randint(0, 5, (6,))) for _ in range(3)]
    passes = []

    class Loader(list):
        def __iter__(self):
            passes.append(1)
            return super().__iter__()

    info = DistInfo(0, 1, 0, torch.device("cpu"), True, "none", False)
    both = evaluate(a, Loader(data), info, ema_model=b)
    assert len(passes) == 1
    alone_a, alone_b = evaluate(a, data, info), evaluate(b, data, info)
    assert both["ema"] == alone_b and {k: v for k, v in both.items() if k != "ema"} == alone_a
    assert both["num_images"] == 18


def test_fp16_run_skips_a_forced_overflow_and_finishes(fake_fmnist, tmp_path, monkeypatch):
    """End to end with train.amp=fp16 (CPU autocast): the first step overflows the GradScaler (its
    scale forced to 2**127); it is counted in epoch 0's skipped_steps and the run finishes."""
    import functools

    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0 ** 127,
                                                                   backoff_factor=2.0 ** -117))
    out = str(tmp_path / "run")
    run_train(tiny_overrides(fake_fmnist, out, **{"train.amp": "fp16"}))
    rows = read_jsonl(os.path.join(out, "log.jsonl"))
    assert [r["skipped_steps"] for r in rows] == [1, 0]
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in rows)
    assert torch.load(os.path.join(out, "last.pth"), weights_only=True)["scaler"]["scale"] <= 2.0 ** 11


def test_evaluate_never_counts_a_non_finite_row_as_a_hit():
    from engine.distributed import DistInfo
    from engine.loop import evaluate

    class Broken(torch.nn.Module):
        def forward(self, x):  # right class on top, but NaN elsewhere in the row
            logits = torch.nn.functional.one_hot(torch.arange(x.shape[0]) % 3, 3).float()
            logits[0, 1] = float("nan")
            return logits

    info = DistInfo(0, 1, 0, torch.device("cpu"), True, "none", False)
    result = evaluate(Broken(), [(torch.zeros(6, 1), torch.arange(6) % 3)], info)
    assert result["top1"] == pytest.approx(100 * 5 / 6) and result["top5"] == pytest.approx(100 * 5 / 6)


def test_tf32_applies_to_cuda_float32_matmuls_and_convolutions_only(monkeypatch):
    """train.tf32 sets both CUDA switches: matmuls and cuDNN's convolutions (the patch embedding),
    which allow TF32 by default whatever the matmul precision says."""
    from engine.run import set_matmul_precision

    before, cudnn_before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        set_matmul_precision(True, torch.device("cpu"))
        assert torch.get_float32_matmul_precision() == before   # CPU stays IEEE float32
        set_matmul_precision(True, torch.device("cuda", 0))
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
        set_matmul_precision(False, torch.device("cuda", 0))
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before)
        torch.backends.cudnn.allow_tf32 = cudnn_before
