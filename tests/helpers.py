"""Helpers shared by the end-to-end tests: tiny training runs on the fake IDX dataset."""
import importlib.util
import os
import signal
import sys

import torch

import train
from engine.logger import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_overrides(data_root, out_dir, **extra):
    o = {
        "data.dataset": "fashion_mnist", "data.root": data_root, "data.workers": 0,
        "data.batch_size": 16, "data.train_transform": "light", "data.mixup": 0, "data.cutmix": 0,
        "data.reprob": 0, "data.repeated_aug": 1, "data.auto_augment": "''",
        "model.name": "vit_micro_multimax_patch7_28", "model.kwargs.depth": 2, "model.kwargs.embed_dim": 32,
        "model.kwargs.num_heads": 2, "model.drop_path_rate": 0.0,
        "optim.lr": 2e-3, "optim.scale_lr": "false", "optim.warmup_epochs": 0.5,
        "train.epochs": 2, "train.log_every": 1, "train.output_dir": out_dir, "train.seed": 3,
    }
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def run_train(args, rc=0):
    """train.py in this process; it must exit ``rc`` (75: a resumable stop, e.g. train.stop_after_epochs)."""
    assert train.main(["--config", os.path.join(ROOT, "configs", "quickstart.yaml"), *args]) == rc


def load_script(name):
    """scripts/<name>.py as a module (scripts are run as files, not imported), loaded once per process."""
    key = f"{name}_script"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, os.path.join(ROOT, "scripts", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def final_weights(run_dir):
    return torch.load(os.path.join(run_dir, "last.pth"), weights_only=True)


def same_rows(a, b):
    """log.jsonl rows equal in every value but the measured throughput."""
    strip = [[{k: v for k, v in r.items() if k != "train_img_per_s"} for r in read_jsonl(os.path.join(d, "log.jsonl"))]
             for d in (a, b)]
    assert strip[0] and strip[0] == strip[1], strip


def assert_exact_resume(ref, resumed):
    a, b = final_weights(ref), final_weights(resumed)
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]
    for key in ("model", "model_ema"):
        for name, t in (a[key] or {}).items():
            assert torch.equal(b[key][name], t), f"{key}.{name}"
    same_rows(ref, resumed)


def criterion_hook(monkeypatch, hook):
    """Call ``hook(n)`` at the n-th (1-based) criterion call of in-process runs (one per
    micro-batch); when it returns true, that call's loss is NaN."""
    import engine.loop

    real, calls = engine.loop.build_criterion, []

    def build(*args):
        criterion = real(*args)

        def hooked(logits, target):
            calls.append(1)
            loss = criterion(logits, target)
            return loss * float("nan") if hook(len(calls)) else loss
        return hooked
    monkeypatch.setattr(engine.loop, "build_criterion", build)


def signal_at_call(monkeypatch, call, sig=signal.SIGTERM):
    """Signal this process during the ``call``-th criterion call (1-based) of in-process runs."""
    criterion_hook(monkeypatch, lambda n: n == call and os.kill(os.getpid(), sig))
