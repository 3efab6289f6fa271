"""Helpers shared by the end-to-end tests: tiny training runs on the fake IDX dataset."""
import importlib.util
import os
import sys

import train

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


def run_train(args):
    rc = train.main(["--config", os.path.join(ROOT, "configs", "quickstart.yaml"), *args])
    assert rc == 0


def load_script(name):
    """scripts/<name>.py as a module (scripts are run as files, not imported), loaded once per process."""
    key = f"{name}_script"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, os.path.join(ROOT, "scripts", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]
