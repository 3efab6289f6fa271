"""engine/config.py and configs/: every preset loads, the DeiT recipe is pinned, and each kind of
user mistake gives a UserError that names the key and where it came from."""
import dataclasses
import glob
import math
import os

import pytest
import timm
import torch
import yaml

import models  # registers the MultiMax/GAP ViTs with timm
from engine.config import (CLI, RETIRED_KEYS, Config, apply_overrides, config_from_yaml_text, config_to_dict,
                           dump_config, effective_lr, load_config, resolve_config)
from engine.errors import UserError
from engine.model import build_model
from helpers import run_train, tiny_overrides
from timm.models import model_entrypoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
# configs/sweeps/ holds sweep files of scripts/sweep.py, not run configs (tests/test_sweep.py loads them)
PRESETS = sorted(p for p in glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True)
                 if not os.path.basename(p).startswith("_") and not os.path.relpath(p, CONFIGS).startswith("sweeps"))
DEIT = [os.path.join(CONFIGS, f"deit_{size}_{kind}.yaml") for size in ("tiny", "small", "base")
        for kind in ("gap", "multimax")]

# The DeiT ImageNet-1k recipe (Touvron et al., 2021), as dotted key -> value.
DEIT_RECIPE = {
    "train.epochs": 300, "optim.opt": "adamw", "optim.lr": 5e-4, "optim.scale_lr": True,
    "optim.lr_base_batch": 512, "optim.weight_decay": 0.05, "optim.sched": "cosine_epoch",
    "optim.warmup_epochs": 5.0, "optim.warmup_lr": 1e-6, "optim.min_lr": 1e-5, "model.drop_path_rate": 0.1,
    "model.drop_rate": 0.0, "model.pos_drop_rate": 0.0, "model.proj_drop_rate": 0.0, "model.attn_drop_rate": 0.0,
    "data.auto_augment": "rand-m9-mstd0.5-inc1", "data.color_jitter": 0.3, "data.mixup": 0.8,
    "data.cutmix": 1.0, "data.mixup_prob": 1.0, "data.mixup_switch_prob": 0.5, "data.mixup_mode": "batch",
    "data.smoothing": 0.1, "data.reprob": 0.25, "data.remode": "pixel", "data.recount": 1,
    "data.repeated_aug": 3, "data.interpolation": "bicubic", "data.crop_pct": 0.875, "model.img_size": 224,
    "train.ema": True, "train.ema_decay": 0.99996, "data.batch_size": 128, "data.dataset": "imagefolder",
    "model.qkv_bias": False, "model.modulator_order": 2, "model.modulator_init": "trunc_normal",
}


def get(cfg: Config, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def error(path, overrides=()) -> str:
    with pytest.raises(UserError) as e:
        load_config(path, list(overrides))
    assert len(str(e.value).splitlines()) == 1, "errors are one line (entry scripts print them as such)"
    return str(e.value)


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------------ the presets

@pytest.mark.parametrize("path", PRESETS, ids=lambda p: os.path.relpath(p, CONFIGS))
def test_every_preset_loads_names_a_registered_model_and_its_own_run_dir(path):
    cfg = load_config(path)
    assert timm.is_model(cfg.model.name), cfg.model.name
    name = os.path.splitext(os.path.relpath(path, CONFIGS))[0]
    assert cfg.train.output_dir == f"runs/{name}"


def test_preset_list_is_complete():
    names = {os.path.relpath(p, CONFIGS) for p in PRESETS}
    assert {os.path.relpath(p, CONFIGS) for p in DEIT} <= names
    assert "quickstart.yaml" in names
    assert len([n for n in names if n.startswith("ablations/")]) >= 10


@pytest.mark.parametrize("path", DEIT, ids=os.path.basename)
def test_deit_presets_follow_the_deit_recipe(path):
    cfg = load_config(path)
    for key, value in DEIT_RECIPE.items():
        assert get(cfg, key) == value, key
    size, kind = os.path.basename(path)[:-5].split("_")[1:]
    assert cfg.model.name == f"deit_{size}_{kind}_patch16_224"
    assert (cfg.model.attn_normalizer, cfg.model.out_normalizer) == (None, None)  # the name decides
    normalizer = "multimax" if kind == "multimax" else "softmax"
    assert built_normalizers(cfg) == (normalizer, normalizer)
    resolved = resolve_config(cfg, world_size=8)["resolved"]
    assert resolved["global_batch"] == 1024
    assert math.isclose(resolved["effective_lr"], 1e-3, rel_tol=1e-12)


# ------------------------------------------------------------------ what a model name builds

OUR_MODELS = sorted(n for n in timm.list_models() if model_entrypoint(n).__module__ == models.vision_transformer.__name__)


def built_normalizers(cfg: Config):
    """(attention, output) normalizers of the model ``cfg`` builds, as the model reports them and
    as its layers are: built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = build_model(cfg.model, 10, 3)
    attn = {b.attn.normalizer.name for b in model.blocks}
    assert len(attn) == 1 and attn == {model.attn_normalizer}
    assert (model.out_modulator is not None) == (model.out_normalizer == "multimax")
    return model.attn_normalizer, model.out_normalizer


def test_our_models_are_found():
    assert len([n for n in OUR_MODELS if "_gap_" in n]) == len([n for n in OUR_MODELS if "_multimax_" in n]) == 4


@pytest.mark.parametrize("name", OUR_MODELS)
def test_every_model_name_builds_its_own_variant_unless_the_config_says_otherwise(name):
    size = [f"model.img_size={28 if name.startswith('vit_micro') else 224}"]  # quickstart.yaml's 28 px is no 16 px grid
    variant = "softmax" if "_gap_" in name else "multimax"
    for path in (None, os.path.join(CONFIGS, "quickstart.yaml"), os.path.join(CONFIGS, "deit_small_multimax.yaml")):
        assert built_normalizers(load_config(path, [f"model.name={name}", *size])) == (variant, variant), path
    explicit = load_config(None, [f"model.name={name}", *size, "model.attn_normalizer=sparsemax",
                                  "model.out_normalizer=multimax"])
    assert built_normalizers(explicit) == ("sparsemax", "multimax")


def test_a_multimax_preset_renamed_to_gap_trains_the_softmax_baseline(tmp_path):
    child = write(tmp_path, "baseline.yaml", f"_base_: {os.path.join(CONFIGS, 'deit_small_multimax.yaml')}\n"
                                             "model:\n  name: deit_small_gap_patch16_224\n")
    assert built_normalizers(load_config(child)) == ("softmax", "softmax")
    child = write(tmp_path, "mm.yaml", f"_base_: {os.path.join(CONFIGS, 'deit_small_gap.yaml')}\n"
                                       "model:\n  name: deit_small_multimax_patch16_224\n")
    assert built_normalizers(load_config(child)) == ("multimax", "multimax")


@pytest.mark.parametrize("ablation, built", [
    ("attention_only", ("multimax", "softmax")), ("output_only", ("softmax", "multimax")),
    ("sparsemax", ("sparsemax", "softmax")), ("entmax15", ("entmax15", "softmax")),
    ("evsoftmax", ("evsoftmax", "softmax")), ("softmax_temperature", ("softmax", "softmax")),
    ("first_order", ("multimax", "multimax")), ("zero_init", ("multimax", "multimax")),
])
def test_ablations_build_the_mix_they_name(ablation, built):
    assert built_normalizers(load_config(os.path.join(CONFIGS, "ablations", f"{ablation}.yaml"))) == built


def test_the_run_records_the_normalizers_it_built(fake_fmnist, tmp_path):
    """A run of a *_gap_* name with the normalizers left to the name writes softmax into its
    config.yaml and checkpoints, and the same command resumes against that record."""
    out = str(tmp_path / "gap")
    args = tiny_overrides(fake_fmnist, out, **{"model.name": "vit_micro_gap_patch7_28", "train.max_steps_per_epoch": 1,
                                              "data.max_val_samples": 8})
    run_train([*args, "train.stop_after_epochs=1"], rc=75)
    with open(os.path.join(out, "config.yaml")) as f:
        saved = yaml.safe_load(f)["model"]
    assert (saved["attn_normalizer"], saved["out_normalizer"]) == ("softmax", "softmax")
    ckpt = torch.load(os.path.join(out, "last.pth"), weights_only=True)
    stored = config_from_yaml_text(ckpt["config"]).model
    assert (stored.attn_normalizer, stored.out_normalizer) == ("softmax", "softmax")
    assert not any("modulator" in k for k in ckpt["model"])
    run_train(args)  # resumes: the recorded normalizers are what the same config builds
    assert torch.load(os.path.join(out, "last.pth"), weights_only=True)["epoch"] == 1


def test_dropout_keys_reach_their_layers():
    cfg = load_config(None, ["model.pos_drop_rate=0.1", "model.proj_drop_rate=0.2", "model.attn_drop_rate=0.3",
                             "model.drop_rate=0.4"])
    with torch.device("meta"):
        m = build_model(cfg.model, 10, 1)
    block = m.blocks[0]
    assert m.pos_drop.p == 0.1 and m.head_drop.p == 0.4 and block.attn.attn_drop.p == 0.3
    assert block.attn.proj_drop.p == block.mlp.drop1.p == block.mlp.drop2.p == 0.2
    assert "model.proj_drop_rate" in error(None, ["model.proj_drop_rate=1.5"])


def test_ablations_change_only_what_they_are_about():
    base = config_to_dict(load_config(os.path.join(CONFIGS, "deit_small_multimax.yaml")))
    cfg = config_to_dict(load_config(os.path.join(CONFIGS, "ablations", "first_order_affine.yaml")))
    changed = {(s, k) for s in base for k in base[s] if base[s][k] != cfg[s][k]}
    assert changed == {("model", "modulator_order"), ("model", "modulator_affine"), ("train", "output_dir")}
    assert load_config(os.path.join(CONFIGS, "ablations", "output_only.yaml")).model.attn_normalizer == "softmax"


# ------------------------------------------------------------------ loading rules

def test_defaults_file_and_overrides_in_that_order(tmp_path):
    path = write(tmp_path, "a.yaml", "optim:\n  lr: 5e-4\n  min_lr: 1.0e-6\ndata:\n  batch_size: 64\n")
    cfg = load_config(path, ["optim.lr=1e-3", "model.kwargs.depth=4", "model.kwargs.embed_dim=32",
                             "data.mean=[0.5, 0.5, 0.5]", "data.std=[0.25,0.25,0.25]",
                             "train.max_steps_per_epoch=null", "train.compile=true", "data.root=/x/y z"])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.min_lr == 1e-6 and cfg.data.batch_size == 64 and cfg.optim.warmup_lr == Config().optim.warmup_lr
    assert cfg.model.kwargs == {"depth": 4, "embed_dim": 32}
    assert cfg.data.mean == [0.5, 0.5, 0.5] and cfg.train.max_steps_per_epoch is None
    assert cfg.train.compile is True and cfg.data.root == "/x/y z"
    assert load_config(None, ["train.max_steps_per_epoch=7"]).train.max_steps_per_epoch == 7
    assert load_config(None, ["data.auto_augment=''"]).data.auto_augment == ""
    assert load_config(None, ["optim.warmup_epochs=2"]).optim.warmup_epochs == 2.0  # int for a float field


def test_yaml_numbers_without_a_dot_are_floats():
    # PyYAML (YAML 1.1) reads 5e-4 as the string "5e-4"; float fields must still get 0.0005.
    cfg = config_from_yaml_text("optim:\n  lr: 5e-4\n  eps: 1e-8\n  betas: [0.9, 9.99e-1]\n")
    assert cfg.optim.lr == 5e-4 and cfg.optim.eps == 1e-8 and cfg.optim.betas == [0.9, 0.999]


def test_base_inheritance_merges_mappings_and_is_relative_to_the_file(tmp_path):
    write(tmp_path, "bases/root.yaml", "model:\n  kwargs: {depth: 2, embed_dim: 16}\noptim:\n  lr: 1.0e-2\n")
    write(tmp_path, "bases/extra.yaml", "_base_: root.yaml\ntrain:\n  epochs: 7\noptim:\n  min_lr: 0.0\n")
    write(tmp_path, "other.yaml", "optim:\n  lr: 3.0e-3\n")
    child = write(tmp_path, "child.yaml",
                  "_base_: [bases/extra.yaml, other.yaml]\nmodel:\n  kwargs: {depth: 3}\ntrain:\n  epochs: 9\n")
    cfg = load_config(child)
    assert cfg.model.kwargs == {"depth": 3, "embed_dim": 16}  # deep merge
    assert cfg.train.epochs == 9 and cfg.optim.lr == 3e-3 and cfg.optim.min_lr == 0.0  # later wins


def test_base_cycle_and_missing_base(tmp_path):
    a = write(tmp_path, "a.yaml", "_base_: b.yaml\n")
    write(tmp_path, "b.yaml", "_base_: a.yaml\n")
    msg = error(a)
    assert "cycle" in msg and "a.yaml" in msg and "b.yaml" in msg
    assert "cycle" in error(write(tmp_path, "self.yaml", "_base_: self.yaml\n"))
    msg = error(write(tmp_path, "c.yaml", "_base_: nowhere.yaml\n"))
    assert "nowhere.yaml" in msg and "c.yaml" in msg
    assert "_base_" in error(write(tmp_path, "d.yaml", "_base_: {x: 1}\n"))


def test_dump_then_load_round_trips(tmp_path):
    cfg = load_config(os.path.join(CONFIGS, "deit_base_multimax.yaml"),
                      ["model.kwargs.depth=4", "data.mean=[0.1,0.2,0.3]", "data.std=[1,2,3]", "optim.clip_grad=1"])
    text = dump_config(cfg)
    assert config_from_yaml_text(text) == cfg
    assert load_config(write(tmp_path, "dumped.yaml", text)) == cfg
    # the run directory's config.yaml (with its `resolved:` section) reads back as well
    resolved = yaml.safe_dump(resolve_config(cfg, 2), sort_keys=False)
    assert load_config(write(tmp_path, "run_config.yaml", resolved)) == cfg


def test_apply_overrides_returns_a_checked_copy():
    cfg = Config()
    new = apply_overrides(cfg, ["optim.lr=2e-3", "model.kwargs.depth=1"])
    assert new.optim.lr == 2e-3 and new.model.kwargs == {"depth": 1}
    assert cfg == Config()
    with pytest.raises(UserError, match="optim.lr"):
        apply_overrides(cfg, ["optim.lr=0"])


def test_resolved_section(monkeypatch):
    cfg = load_config(None, ["data.batch_size=32", "train.accum_steps=2", "optim.lr=4e-4"])
    r = resolve_config(cfg, world_size=3)["resolved"]
    assert r["world_size"] == 3 and r["global_batch"] == 32 * 3 * 2
    assert math.isclose(r["effective_lr"], 4e-4 * 192 / 512) and r["effective_lr"] == effective_lr(cfg, 3)
    assert set(r["versions"]) == {"python", "torch", "torchvision", "timm", "numpy"}
    assert r["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert isinstance(r["git_sha"], str) and r["git_sha"] and r["time"].endswith("+00:00")
    assert effective_lr(load_config(None, ["optim.scale_lr=false", "optim.lr=4e-4"]), 64) == 4e-4
    monkeypatch.setenv("PATH", "")  # no git at all: "unknown", not a crash
    assert resolve_config(cfg, 1)["resolved"]["git_sha"] == "unknown"


# ------------------------------------------------------------------ user mistakes

def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    path = write(tmp_path, "typo.yaml", "optim:\n  lrr: 1.0e-3\n")
    msg = error(path)
    assert "optim.lrr" in msg and "typo.yaml" in msg and "optim.lr'" in msg
    msg = error(None, ["train.batch_size=3"])  # right name, wrong section
    assert "train.batch_size" in msg and CLI in msg and "data.batch_size" in msg
    assert "modle" in error(write(tmp_path, "top.yaml", "modle:\n  name: x\n"))


def test_wrong_type_names_key_file_expected_type_and_value(tmp_path):
    msg = error(write(tmp_path, "t.yaml", "data:\n  batch_size: lots\n"))
    assert "data.batch_size" in msg and "t.yaml" in msg and "int" in msg and "lots" in msg
    for override, key in [("data.batch_size=abc", "data.batch_size"), ("data.batch_size=2.5", "data.batch_size"),
                          ("train.ema=1", "train.ema"), ("optim.lr=abc", "optim.lr"), ("optim.lr=.inf", "optim.lr"),
                          ("data.mean=0.5", "data.mean"), ("data.mean=[a]", "data.mean"),
                          ("model.kwargs=3", "model.kwargs"), ("model=3", "model"), ("train.epochs=null", "train.epochs"),
                          ("optim.lr=true", "optim.lr")]:
        msg = error(None, [override])
        assert key in msg and CLI in msg, (override, msg)


def test_missing_file_malformed_yaml_and_bad_top_level(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    assert missing in error(missing)
    msg = error(write(tmp_path, "bad.yaml", "model:\n  name: ok\n  kwargs: [unclosed\ntrain:\n  epochs: 3\n"))
    assert "bad.yaml" in msg and "line" in msg
    assert "line 4" in error(write(tmp_path, "tab.yaml", "model:\n  name: x\n\n\tbad: 1\n"))
    assert "mapping" in error(write(tmp_path, "list.yaml", "- 1\n- 2\n"))
    assert load_config(write(tmp_path, "empty.yaml", "")) == Config()


@pytest.mark.parametrize("override, key", [
    ("optim.lr=-1", "optim.lr"), ("data.batch_size=0", "data.batch_size"), ("data.crop_pct=1.5", "data.crop_pct"),
    ("model.modulator_order=0", "model.modulator_order"), ("train.epochs=0", "train.epochs"),
    ("train.accum_steps=0", "train.accum_steps"), ("train.ema_decay=1", "train.ema_decay"),
    ("data.reprob=1.5", "data.reprob"), ("optim.warmup_epochs=-1", "optim.warmup_epochs"),
    ("optim.min_lr=-1e-5", "optim.min_lr"), ("model.softmax_temperature=0", "model.softmax_temperature"),
    ("data.repeated_aug=0", "data.repeated_aug"), ("model.attn_normalizer=multimx", "model.attn_normalizer"),
    ("model.out_normalizer=sparsemax", "model.out_normalizer"), ("train.amp=fp8", "train.amp"),
    ("train.device=tpu", "train.device"), ("optim.sched=step", "optim.sched"), ("optim.betas=[0.9]", "optim.betas"),
    ("data.std=[0.5,0]", "data.std"), ("data.scale=[0.5,0.1]", "data.scale"),
])
def test_out_of_range_values_are_rejected_with_the_key(override, key):
    msg = error(None, [override])
    assert key in msg and "command line" in msg, msg


def test_mean_and_std_need_the_same_length():
    assert "data.std" in error(None, ["data.mean=[0.5]", "data.std=[0.5,0.5]"])


def test_out_of_range_value_from_a_file_names_the_file(tmp_path):
    msg = error(write(tmp_path, "neg.yaml", "optim:\n  lr: -1.0e-3\n"))
    assert "optim.lr" in msg and "neg.yaml" in msg and "> 0" in msg
    assert "did you mean 'multimax'" in error(None, ["model.attn_normalizer=MultiMax"])


def test_retired_keys_load_from_files_and_are_refused_on_the_command_line(tmp_path):
    """A key the schema no longer has (RETIRED_KEYS) is dropped where an older file sets it (a run's
    config.yaml, a checkpoint's stored config) and refused, with the reason, when typed now."""
    old = {"optim": {"lr": 1.0e-3}, "train": {"epochs": 2}}
    for dotted in RETIRED_KEYS:
        section, key = dotted.split(".")
        old[section][key] = "anything"
    text = yaml.safe_dump(old)
    expected = load_config(None, ["optim.lr=1e-3", "train.epochs=2"])
    assert config_from_yaml_text(text) == expected
    path = tmp_path / "old.yaml"
    path.write_text(text)
    assert load_config(str(path)) == expected
    for dotted, reason in RETIRED_KEYS.items():
        with pytest.raises(UserError, match=f"command line: {dotted} no longer exists") as e:
            load_config(None, [f"{dotted}=anything"])
        assert reason in str(e.value)


def test_override_without_equals_sign():
    assert error(None, ["optim.lr"]) == (
        "override 'optim.lr' must look like key=value (e.g. optim.lr=1e-3)")
    assert "key=value" in error(None, ["=3"])


@pytest.mark.parametrize("name, suggestion", [
    ("fashion_mnsit", "fashion_mnist"), ("cifar10", "torch/cifar10"), ("imagefoldr", "imagefolder"),
    ("torch/cifar01", "torch/cifar10"), ("ImageFolders", "imagefolder"), ("tourch/cifar10", "torch/cifar10"),
])
def test_unknown_dataset_names_get_a_suggestion(name, suggestion, tmp_path):
    msg = error(None, [f"data.dataset={name}"])
    assert f"data.dataset = '{name}'" in msg and f"did you mean '{suggestion}'" in msg and CLI in msg
    msg = error(write(tmp_path, "d.yaml", f"data:\n  dataset: {name}\n"))
    assert "d.yaml" in msg and suggestion in msg
    assert "streaming" in error(None, ["data.dataset=wds/shards"])
    for ok in ("fashion_mnist", "Fashion-MNIST", "imagefolder", "image_folder", "torch/CIFAR10", "torch/inat",
               "hfds/user/set"):
        assert load_config(None, [f"data.dataset={ok}"]).data.dataset == ok


def test_torch_dataset_names_are_the_ones_timms_factory_builds():
    """torch/<name> is asked of timm's factory itself: torchvision has SVHN, but timm builds no
    torch/svhn, so the config refuses it rather than the run failing later."""
    from engine.config import timm_builds_torch_dataset

    assert timm_builds_torch_dataset("places365") and timm_builds_torch_dataset("image_folder")
    assert not timm_builds_torch_dataset("svhn")
    assert "is not a torchvision dataset timm's factory builds" in error(None, ["data.dataset=torch/svhn"])


def test_tilde_in_path_keys_is_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(write(tmp_path, "p.yaml", "data:\n  root: ~/imagenet\nmodel:\n  init_checkpoint: ~/w.pth\n"),
                      ["train.output_dir=~/runs/a", "train.resume=~/old/last.pth"])
    assert cfg.data.root == str(tmp_path / "imagenet") and cfg.model.init_checkpoint == str(tmp_path / "w.pth")
    assert cfg.train.output_dir == str(tmp_path / "runs" / "a") and cfg.train.resume == str(tmp_path / "old" / "last.pth")
    assert load_config(None, ["data.root=~"]).data.root == str(tmp_path)  # not YAML's null
    assert load_config(None, ["train.resume=auto"]).train.resume == "auto"
    assert load_config(None, ["data.auto_augment=~x"]).data.auto_augment == "~x"  # only path keys
    assert "quote it" in error(write(tmp_path, "null.yaml", "data:\n  root: ~\n"))


def test_duplicate_yaml_keys_name_file_line_and_key(tmp_path):
    msg = error(write(tmp_path, "dup.yaml", "optim:\n  lr: 1.0e-3\n  min_lr: 0.0\n  lr: 2.0e-3\n"))
    assert "dup.yaml, line 4" in msg and "duplicate key 'lr'" in msg and "line 2" in msg
    msg = error(write(tmp_path, "sections.yaml", "train:\n  epochs: 3\noptim:\n  lr: 1.0e-3\ntrain:\n  seed: 1\n"))
    assert "sections.yaml, line 5" in msg and "'train'" in msg
    assert "duplicate key 'name'" in error(write(tmp_path, "flow.yaml", "model: {name: a, name: b}\n"))
    # a YAML merge key overrides on purpose and stays allowed
    assert load_config(write(tmp_path, "merge.yaml", "optim:\n  <<: {lr: 1.0}\n  lr: 2.0e-3\n")).optim.lr == 2e-3


def test_config_checks_the_models_own_choices_with_the_models_own_check():
    """The choice lists the config checks against are the very objects the models use, and a
    model built directly (timm.create_model) refuses a bad value in the same words."""
    from engine.config import KEYS

    assert KEYS["model.attn_normalizer"].choices == models.choices.NORMALIZERS
    assert KEYS["model.attn_backend"].choices == models.choices.ATTN_BACKENDS
    with pytest.raises(UserError, match=r"model.attn_backend = 'flexx' is not one of .*; did you mean 'flex'"):
        load_config(None, ["model.attn_backend=flexx"])
    with pytest.raises(ValueError, match=r"attention backend = 'flexx' is not one of .*; did you mean 'flex'"):
        timm.create_model("vit_micro_multimax_patch7_28", attn_backend="flexx")
    with pytest.raises(ValueError, match=r"out_normalizer = 'sparsemax' is not one of softmax \| multimax"):
        timm.create_model("vit_micro_multimax_patch7_28", out_normalizer="sparsemax")


def test_every_key_is_declared_once_with_its_help():
    """A key's facts are its declaration (engine.config.key): every field has one, with a one-line
    help; the loop's options read train.* and optim.* keys by name, so the two share none."""
    from engine.config import KEYS, DataConfig, ModelConfig, OptimConfig, TrainConfig

    sections = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig}
    assert list(KEYS) == [f"{s}.{f.name}" for s, cls in sections.items() for f in dataclasses.fields(cls)]
    for dotted, spec in KEYS.items():
        assert spec.help.strip() and "\n" not in spec.help, dotted
    assert not {f.name for f in dataclasses.fields(TrainConfig)} & {f.name for f in dataclasses.fields(OptimConfig)}
    cfg = load_config(os.path.join(CONFIGS, "deit_small_multimax.yaml"),
                      ["model.kwargs.depth=4", "model.kwargs.extra={a: [1, 2]}", "data.root=/data/a #b"])
    text = dump_config(cfg, help=True)
    assert config_from_yaml_text(text) == cfg
    assert "  lr: 0.0005  # peak lr for lr_base_batch images per step\n" in text
    assert "  # extra timm.create_model kwargs\n  kwargs:\n" in text  # a value over several lines: the help above
