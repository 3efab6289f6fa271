"""Typed run configuration: defaults → YAML file (with ``_base_``) → dotted CLI overrides.

The dataclasses are the schema that train.py, eval.py, data/ and engine/ code against.
``load_config`` starts from their defaults, applies a YAML file (after the files its
``_base_`` names, recursively; mappings merge key by key), then ``key.sub=value`` overrides,
and checks every key, type and value range. Mistakes raise ``UserError`` naming the dotted
key and where it came from (file or command line). ``resolve_config`` adds the derived
values (global batch, effective lr, git SHA, versions) that the run directory records.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import difflib
import functools
import importlib.metadata
import importlib.util
import math
import os
import platform
import subprocess
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import yaml

from .errors import UserError


def _model_choices() -> types.ModuleType:
    """``models.choices``, the values of the model knobs, loaded from its file without running
    ``models/__init__`` (torch, timm: seconds a config check does not need). It is registered
    under its own name, so a later ``import models`` uses this very module."""
    name = "models.choices"
    if name not in sys.modules:
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "choices.py")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


MODEL_CHOICES = _model_choices()
LR_SCHEDULES = ("cosine_epoch", "cosine", "constant")  # engine.optim.build_schedule

# data.dataset: ours (any spelling below), or one of timm's map-style datasets: torch/<name> for the
# torchvision datasets timm's factory builds, hfds/<name> for Hugging Face datasets. timm's
# streaming kinds cannot be sharded by the samplers in data/.
FASHION_MNIST_NAMES = ("fashion_mnist", "fashion-mnist", "fashionmnist")
IMAGEFOLDER_NAMES = ("imagefolder", "image_folder")
TIMM_TORCH_DATASETS = ("cifar10", "cifar100", "mnist", "kmnist", "fashion_mnist", "qmnist", "places365",
                       "inaturalist", "inat", "imagenet", "image_folder", "folder")
TIMM_STREAMING_PREFIXES = ("hfids", "tfds", "wds")
# Keys holding paths: a leading ~ is expanded as the shell would.
PATH_KEYS = ("data.root", "train.output_dir", "train.resume", "model.init_checkpoint")
# Keys the schema no longer has, with what replaced them. Each only chose how fast a step ran, never
# what it computed, so a file that sets one (an older run directory's config.yaml, a checkpoint's
# stored config, a config copied from them) still loads with the key dropped; on the command line,
# where it is typed now, it is refused with this reason.
RETIRED_KEYS = {
    "optim.impl": "AdamW runs fused wherever torch has the kernel for the parameters (CPU and CUDA)",
    "train.cpu_malloc": "glibc's malloc reads its settings from the environment: MALLOC_TRIM_THRESHOLD_, "
                        "MALLOC_MMAP_THRESHOLD_ (docs/PERFORMANCE.md)",
}


@dataclass
class ModelConfig:
    name: str = "vit_micro_multimax_patch7_28"
    num_classes: Optional[int] = None          # None: taken from the dataset
    img_size: int = 28
    patch_size: Optional[int] = None           # None: the registered model's
    in_chans: Optional[int] = None             # None: taken from the dataset
    # None: the registered variant's (*_multimax_* → multimax, *_gap_* → softmax); train.py records
    # the normalizers it built in the run's config.yaml
    attn_normalizer: Optional[str] = None      # models/choices.py: NORMALIZERS
    out_normalizer: Optional[str] = None       # OUT_NORMALIZERS
    modulator_order: int = 2
    modulator_init: str = "trunc_normal"       # MODULATOR_INITS
    modulator_affine: bool = False             # x -> t*x + b before sigma (authors' later variant)
    softmax_temperature: float = 1.0
    qkv_bias: bool = False                     # the paper's code has none
    attn_backend: str = "auto"                 # ATTN_BACKENDS (which runs where: docs/PERFORMANCE.md)
    # Dropout as timm 1.x names it. The paper's (and DeiT's) `drop_rate` is pos_drop_rate and
    # proj_drop_rate at one value; timm 1.x's drop_rate is the head dropout, which the paper's code lacks.
    drop_rate: float = 0.0                     # before the classifier head
    pos_drop_rate: float = 0.0                 # after adding the position embedding
    proj_drop_rate: float = 0.0                # after the attention projection and in the MLP
    attn_drop_rate: float = 0.0                # on the attention probabilities
    drop_path_rate: float = 0.1
    grad_checkpointing: bool = False
    init_checkpoint: str = ""                  # weights to start from (models.load_weights)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs


@dataclass
class DataConfig:
    dataset: str = "fashion_mnist"             # fashion_mnist | imagefolder | torch/<name> | hfds/<name> (timm)
    root: str = ""                             # fashion_mnist: "" = Debian's package or the user cache
    train_split: str = "train"
    val_split: str = "val"
    download: bool = False                     # fetch a missing dataset (fashion_mnist, torch/<name>)
    batch_size: int = 128                      # per process
    eval_batch_size: Optional[int] = None      # None: 1.5 x batch_size (DeiT)
    workers: int = 8
    pin_memory: bool = True
    train_transform: str = "deit"              # deit | light (random crop + flip) | none
    scale: List[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: List[float] = field(default_factory=lambda: [3.0 / 4.0, 4.0 / 3.0])
    hflip: float = 0.5
    color_jitter: float = 0.3
    auto_augment: str = "rand-m9-mstd0.5-inc1"  # "" disables
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    mean: Optional[List[float]] = None         # None: the dataset's default
    std: Optional[List[float]] = None
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    repeated_aug: int = 3                      # copies per image, one per process (capped at the process
                                               # count: off on one process, as in DeiT); 1 disables it
    mixup: float = 0.8
    cutmix: float = 1.0
    cutmix_minmax: Optional[List[float]] = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    smoothing: float = 0.1
    bad_images: str = "error"                  # error | skip
    max_train_samples: Optional[int] = None    # subsets for smoke runs
    max_val_samples: Optional[int] = None


@dataclass
class OptimConfig:
    opt: str = "adamw"
    lr: float = 5e-4                           # base lr at lr_base_batch
    lr_base_batch: int = 512
    scale_lr: bool = True                      # lr * global_batch / lr_base_batch
    weight_decay: float = 0.05
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    clip_grad: Optional[float] = None
    sched: str = "cosine"                      # cosine_epoch (DeiT's: timm's cosine stepped per epoch) |
                                               # cosine (per step) | constant (after a per-step warmup)
    warmup_epochs: float = 5.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5


@dataclass
class TrainConfig:
    epochs: int = 300
    output_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"                       # auto | cpu | cuda
    amp: str = "none"                          # none | bf16 | fp16
    accum_steps: int = 1
    compile: bool = False
    ema: bool = False
    ema_decay: float = 0.99996
    resume: str = "auto"                       # auto | none | <path>
    keep_top_k: int = 3
    eval_every: int = 1
    log_every: int = 50
    nonfinite: str = "stop"                    # stop | skip
    max_consecutive_skips: int = 100           # stop after this many skipped steps in a row (any policy, fp16 overflows too)
    tf32: bool = True                          # CUDA float32 matmuls on TF32 tensor cores (Ampere+); CPU unaffected
    log_modulators: bool = True
    plot_modulators: bool = False
    allow_config_change: bool = False
    max_steps_per_epoch: Optional[int] = None  # smoke runs
    stop_after_epochs: Optional[int] = None    # end this job after N epochs (rerun to resume)
    dist_backend: str = "auto"                 # auto | nccl | gloo


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


CLI = "command line"
Layer = Tuple[str, Dict[str, Any]]  # (where it came from, the mapping it sets)


# ---------------------------------------------------------------- public API

def load_config(path: Optional[str], overrides: Iterable[str] = ()) -> Config:
    """Defaults ← the YAML file at ``path`` (None: defaults only) ← ``key.sub=value`` overrides."""
    cfg, sources = Config(), {}
    for source, mapping in (_file_layers(path, (), "") if path else []):
        _merge(cfg, mapping, "", source, sources)
    _apply_overrides(cfg, overrides, sources)
    validate(cfg, sources)
    return cfg


def apply_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    """A checked copy of ``cfg`` with ``key.sub=value`` overrides applied (``cfg`` is untouched)."""
    cfg, sources = copy.deepcopy(cfg), {}
    _apply_overrides(cfg, overrides, sources)
    validate(cfg, sources)
    return cfg


def config_from_yaml_text(text: str, source: str = "checkpoint") -> Config:
    """The Config stored as YAML text (in a checkpoint); ``source`` names it in errors."""
    cfg, sources = Config(), {}
    for layer_source, mapping in _layers(_parse_yaml(text, source), source, os.getcwd(), ()):
        _merge(cfg, mapping, "", layer_source, sources)
    validate(cfg, sources)
    return cfg


def config_to_dict(cfg: Config) -> Dict[str, Any]:
    """Nested plain dict (sections → fields), a deep copy."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    """YAML text that ``load_config``/``config_from_yaml_text`` read back to an equal Config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def global_batch(cfg: Config, world_size: int) -> int:
    """Images per optimizer step: per-process batch × processes × accumulation steps."""
    return cfg.data.batch_size * world_size * cfg.train.accum_steps


def effective_lr(cfg: Config, world_size: int) -> float:
    """The peak lr: ``optim.lr`` scaled linearly by global_batch / lr_base_batch (DeiT) if scale_lr."""
    if not cfg.optim.scale_lr:
        return cfg.optim.lr
    return cfg.optim.lr * global_batch(cfg, world_size) / cfg.optim.lr_base_batch


def resolve_config(cfg: Config, world_size: int) -> Dict[str, Any]:
    """The config plus a ``resolved`` section of derived facts, as written to the run directory."""
    out = config_to_dict(cfg)
    out["resolved"] = {
        "world_size": world_size,
        "global_batch": global_batch(cfg, world_size),
        "effective_lr": effective_lr(cfg, world_size),
        "git_sha": _git_sha(),
        "versions": {"python": platform.python_version(),
                     **{name: _version(name) for name in ("torch", "torchvision", "timm", "numpy")}},
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return out


# ---------------------------------------------------------------- reading YAML

class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first_line: int):
        super().__init__(key)
        self.key, self.line, self.first_line = key, line, first_line


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error (PyYAML keeps the
    last silently, so a forgotten earlier line would win or lose without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Dict[Any, Any]:
        first_lines: Dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` overrides on purpose
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in first_lines:
                    raise _DuplicateKey(key, line, first_lines[key])
                first_lines[key] = line
            except TypeError:  # an unhashable key: the base class reports it
                pass
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, source: str) -> Any:
    """The YAML document ``text`` (safe types only); malformed YAML or a key given twice in one
    mapping is a one-line UserError naming ``source`` and the line."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except _DuplicateKey as e:
        raise UserError(f"{source}, line {e.line}: duplicate key '{e.key}' (first at line {e.first_line}); "
                        "remove one of them") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}, line {mark.line + 1}" if mark is not None else source
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{where}: malformed YAML: {problem}") from None


def _parse_yaml(text: str, source: str) -> Dict[str, Any]:
    """The top-level mapping of a YAML config; a ``resolved`` section (derived values in a
    run directory's config.yaml) is dropped so such a file can be read back."""
    data = parse_yaml(text, source)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{source}: the top level must be a mapping of sections "
                        f"(model, data, optim, train), got {type(data).__name__}")
    data.pop("resolved", None)
    return data


def _file_layers(path: str, stack: Tuple[str, ...], included_by: str) -> List[Layer]:
    """The layers of the file at ``path``: its bases' layers (in order), then its own."""
    real = os.path.realpath(path)
    if real in stack:
        chain = " -> ".join([*stack[stack.index(real):], real])
        raise UserError(f"_base_ cycle: {chain}")
    where = f" (_base_ of {included_by})" if included_by else ""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}{where}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read config file {path}{where}: {getattr(e, 'strerror', None) or e}") from None
    return _layers(_parse_yaml(text, path), path, os.path.dirname(path), (*stack, real))


def _layers(mapping: Dict[str, Any], source: str, base_dir: str, stack: Tuple[str, ...]) -> List[Layer]:
    """Expand ``_base_`` (a path or list of paths relative to ``base_dir``) ahead of ``mapping``."""
    bases = mapping.pop("_base_", [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise UserError(f"{source}: _base_ must be a path or a list of paths, got {bases!r}")
    layers: List[Layer] = []
    for base in bases:
        layers += _file_layers(os.path.join(base_dir, os.path.expanduser(base)), stack, source)
    return layers + [(source, mapping)]


def _apply_overrides(cfg: Config, overrides: Iterable[str], sources: Dict[str, str]) -> None:
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"override {item!r} must look like key=value (e.g. optim.lr=1e-3)")
        try:  # YAML gives numbers, true/false, null and [lists]; "key=" means the empty string
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text  # e.g. a path with an unbalanced bracket: take it verbatim
        if text.strip().startswith("~") and key in PATH_KEYS:
            value = text.strip()  # a home-relative path (YAML would read a bare ~ as null)
        for part in reversed(key.split(".")):
            value = {part: value}
        _merge(cfg, value, "", CLI, sources)


# ---------------------------------------------------------------- keys and types

@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.lru_cache(maxsize=None)
def _all_keys(cls: type = Config, prefix: str = "") -> Tuple[str, ...]:
    """Every dotted key of the schema, sections included."""
    keys: List[str] = []
    for f in dataclasses.fields(cls):
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(_hints(cls)[f.name]):
            keys += _all_keys(_hints(cls)[f.name], f"{prefix}{f.name}.")
    return tuple(keys)


def _merge(node: Any, mapping: Dict[str, Any], prefix: str, source: str, sources: Dict[str, str]) -> None:
    """Write ``mapping`` onto the dataclass ``node`` key by key (sub-mappings merge), checking
    names and types (``RETIRED_KEYS``: dropped), and note in ``sources`` where each dotted key was
    last set."""
    hints = _hints(type(node))
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if dotted in RETIRED_KEYS:
            if source == CLI:
                raise UserError(f"{source}: {dotted} no longer exists ({RETIRED_KEYS[dotted]}); drop it")
            continue
        if key not in hints:
            leaf = dotted.rsplit(".", 1)[-1]  # right name in the wrong section?
            guess = [k for k in _all_keys() if k.rsplit(".", 1)[-1] == leaf] or \
                difflib.get_close_matches(dotted, _all_keys(), n=1)
            hint = f"; did you mean '{guess[0]}'?" if guess else ""
            raise UserError(f"{source}: unknown key '{dotted}'{hint}")
        current = getattr(node, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UserError(f"{source}: {dotted} must be a mapping of its fields, got {value!r}")
            _merge(current, value, dotted + ".", source, sources)
            continue
        try:
            value = _convert(value, hints[key], current)
        except TypeError:
            hint = " (a bare ~ is YAML's null: quote it, '~')" if dotted in PATH_KEYS and value is None else ""
            raise UserError(f"{source}: {dotted} expects {_type_name(hints[key])}, got {value!r}{hint}") from None
        setattr(node, key, os.path.expanduser(value) if dotted in PATH_KEYS and value else value)
        sources[dotted] = source


def _convert(value: Any, tp: Any, current: Any = None) -> Any:
    """``value`` as schema type ``tp`` (mappings merge into ``current``); TypeError if it is not one.
    Ints pass as floats, and so do numeric strings: PyYAML reads ``5e-4`` (no dot) as a string."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        return None if value is None else _convert(value, next(a for a in args if a is not type(None)))
    if tp is Any:
        return value
    if origin is dict and isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return _deep_merge(current or {}, value)
    if origin is list and isinstance(value, (list, tuple)):
        return [_convert(v, args[0]) for v in value]
    if tp is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = float(value)
        except ValueError:
            raise TypeError from None
        if math.isfinite(number):
            return number
    if tp in (int, str, bool) and type(value) is tp:  # no bool-as-int, no int-as-str
        return value
    raise TypeError


def _deep_merge(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


_TYPE_NAMES = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false"}


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        return f"{_type_name(next(a for a in args if a is not type(None)))} or null"
    if origin is list:
        return f"a list ({_type_name(args[0])} each)"
    return "a mapping" if origin is dict else _TYPE_NAMES.get(tp, str(tp))


# ---------------------------------------------------------------- value ranges

_CHOICES: Dict[str, Tuple[str, ...]] = {
    "model.attn_normalizer": MODEL_CHOICES.NORMALIZERS,
    "model.out_normalizer": MODEL_CHOICES.OUT_NORMALIZERS,
    "model.modulator_init": MODEL_CHOICES.MODULATOR_INITS,
    "model.attn_backend": MODEL_CHOICES.ATTN_BACKENDS,
    "data.train_transform": ("deit", "light", "none"),
    "data.interpolation": ("bicubic", "bilinear", "nearest", "box", "hamming", "lanczos", "random"),
    "data.remode": ("pixel", "rand", "const"),  # timm's RandomErasing modes
    "data.mixup_mode": ("batch", "pair", "elem"),  # timm's Mixup modes
    "data.bad_images": ("error", "skip"),
    "optim.opt": ("adamw",),
    "optim.sched": LR_SCHEDULES,
    "train.device": ("auto", "cpu", "cuda"),
    "train.amp": ("none", "bf16", "fp16"),
    "train.nonfinite": ("stop", "skip"),
    "train.dist_backend": ("auto", "nccl", "gloo"),
}

_OPTIONAL_CHOICES = ("model.attn_normalizer", "model.out_normalizer")  # None: the model variant's


def dataset_name_problem(name: str) -> Optional[str]:
    """What is wrong with ``data.dataset = name`` (completing "data.dataset = 'name' ..."), or None.
    Prefixes are case-insensitive, as in timm's factory."""
    prefix, slash, rest = name.partition("/")
    prefix = prefix.lower()
    if not slash and name.lower() in FASHION_MNIST_NAMES + IMAGEFOLDER_NAMES:
        return None
    if slash and prefix == "torch" and rest.lower() in TIMM_TORCH_DATASETS:
        return None
    if slash and prefix == "hfds" and rest:
        return None
    if slash and prefix in TIMM_STREAMING_PREFIXES:
        return ("is a streaming (iterable) dataset, which the samplers here cannot shard; use an ImageFolder "
                "copy (imagefolder) or a map-style dataset (torch/<name>, hfds/<name>)")
    known = [*FASHION_MNIST_NAMES[:1], *IMAGEFOLDER_NAMES[:1], *(f"torch/{n}" for n in TIMM_TORCH_DATASETS)]
    if slash and prefix == "torch":
        close = difflib.get_close_matches(f"torch/{rest.lower()}", known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"is not a torchvision dataset timm can build (torch/{' | torch/'.join(TIMM_TORCH_DATASETS)}){hint}"
    close = [f"torch/{name.lower()}"] if name.lower() in TIMM_TORCH_DATASETS else \
        difflib.get_close_matches(name.lower(), known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"is not a known dataset (fashion_mnist | imagefolder | torch/<name> | hfds/<name>){hint}"


Rule = Tuple[str, Callable[[Any], bool]]
_POSITIVE: Rule = ("> 0", lambda v: v > 0)
_AT_LEAST_1: Rule = (">= 1", lambda v: v >= 1)
_NON_NEGATIVE: Rule = (">= 0", lambda v: v >= 0)
_PROBABILITY: Rule = ("in [0, 1]", lambda v: 0 <= v <= 1)
_NOT_EMPTY: Rule = ("not empty", lambda v: len(v) > 0)
_RANGES: Dict[str, Rule] = {
    **dict.fromkeys(["model.name", "data.dataset", "train.output_dir", "train.resume"], _NOT_EMPTY),
    **dict.fromkeys(["optim.lr", "optim.eps", "optim.clip_grad", "model.softmax_temperature"], _POSITIVE),
    **dict.fromkeys(["model.modulator_order", "model.num_classes", "model.img_size", "model.patch_size",
                     "model.in_chans", "data.batch_size", "data.eval_batch_size", "data.recount",
                     "data.repeated_aug", "data.max_train_samples", "data.max_val_samples",
                     "optim.lr_base_batch", "train.epochs", "train.accum_steps", "train.eval_every",
                     "train.log_every", "train.max_steps_per_epoch", "train.stop_after_epochs",
                     "train.max_consecutive_skips"], _AT_LEAST_1),
    **dict.fromkeys(["data.workers", "data.color_jitter", "data.mixup", "data.cutmix", "optim.weight_decay",
                     "optim.warmup_epochs", "optim.warmup_lr", "optim.min_lr", "train.keep_top_k"],
                    _NON_NEGATIVE),
    **dict.fromkeys(["model.drop_rate", "model.pos_drop_rate", "model.proj_drop_rate", "model.attn_drop_rate",
                     "model.drop_path_rate", "data.hflip", "data.reprob",
                     "data.mixup_prob", "data.mixup_switch_prob"], _PROBABILITY),
    "data.crop_pct": ("in (0, 1]", lambda v: 0 < v <= 1),
    "data.smoothing": ("in [0, 1)", lambda v: 0 <= v < 1),
    "train.ema_decay": ("in [0, 1)", lambda v: 0 <= v < 1),
    "optim.betas": ("two numbers in [0, 1)", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v)),
    "data.scale": ("[min, max] with 0 < min <= max <= 1", lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1),
    "data.cutmix_minmax": ("[min, max] with 0 < min <= max <= 1", lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1),
    "data.ratio": ("[min, max] with 0 < min <= max", lambda v: len(v) == 2 and 0 < v[0] <= v[1]),
    "data.mean": _NOT_EMPTY,
    "data.std": ("a list of numbers > 0", lambda v: len(v) > 0 and all(s > 0 for s in v)),
}


def validate(cfg: Config, sources: Optional[Dict[str, str]] = None) -> None:
    """Check value ranges and choices; the UserError names the key, its value, what is allowed
    and (from ``sources``, dotted key → file or command line) where the value was set."""
    flat = {f"{s}.{k}": v for s, section in config_to_dict(cfg).items() for k, v in section.items()}
    sources = sources or {}

    def where(key: str) -> str:
        source = sources.get(key)
        return " (the default)" if source is None else " (set on the command line)" if source == CLI \
            else f" (set in {source})"

    for key, choices in _CHOICES.items():
        if flat[key] not in choices and not (key in _OPTIONAL_CHOICES and flat[key] is None):
            close = difflib.get_close_matches(str(flat[key]), choices, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UserError(f"{key} = {flat[key]!r} is not one of {' | '.join(choices)}{hint}{where(key)}")
    for key, (allowed, ok) in _RANGES.items():
        if flat[key] is not None and not ok(flat[key]):
            raise UserError(f"{key} = {flat[key]!r} is out of range: must be {allowed}{where(key)}")
    problem = dataset_name_problem(cfg.data.dataset)
    if problem:
        raise UserError(f"data.dataset = {cfg.data.dataset!r} {problem}{where('data.dataset')}")
    if cfg.data.mean is not None and cfg.data.std is not None and len(cfg.data.mean) != len(cfg.data.std):
        raise UserError(f"data.mean and data.std need one value per channel each, got {cfg.data.mean} "
                        f"and {cfg.data.std}{where('data.std')}")


# ---------------------------------------------------------------- provenance

def _git_sha() -> str:
    """HEAD of the repository holding this file, or "unknown" (no git, not a checkout)."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
