"""Typed run configuration: defaults → YAML file (with ``_base_``) → dotted CLI overrides.

The dataclasses are the schema that train.py, eval.py, data/ and engine/ code against. Each key
is declared once, by ``key``: its type (the annotation), default, one-line help, allowed values
(``choices`` or a ``check``), whether it holds a path and whether a resumed run may change it.
The checks, ``dump_config(help=True)`` (``train.py --print-config``) and the resume check
(``engine.run``) read these declarations (``KEYS``); the training loop (``engine.loop.Trainer``)
reads the ``train`` and ``optim`` sections themselves. ``load_config`` starts from the defaults,
applies a YAML file (after the files its ``_base_`` names, recursively; mappings merge key by
key), then ``key.sub=value`` overrides, and checks every key, type and value. Mistakes raise
``UserError`` naming the dotted key and where it came from (file or command line).
``resolve_config`` adds the derived values (global batch, effective lr, git SHA, versions) that the
run directory records.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import difflib
import functools
import importlib.metadata
import math
import os
import platform
import re
import subprocess
import tempfile
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torchvision.datasets
import yaml
from timm.data import create_dataset as timm_create_dataset

from models.choices import ATTN_BACKENDS, MODULATOR_INITS, NORMALIZERS, OUT_NORMALIZERS, choice_problem

from .errors import UserError

# Keys the schema no longer has, with what replaced them. Each only chose how fast a step ran, never
# what it computed, so a file that sets one (an older run directory's config.yaml, a checkpoint's
# stored config, a config copied from them) still loads with the key dropped; on the command line,
# where it is typed now, it is refused with this reason.
RETIRED_KEYS = {
    "optim.impl": "AdamW runs fused wherever torch has the kernel for the parameters (CPU and CUDA)",
    "train.cpu_malloc": "glibc's malloc reads its settings from the environment: MALLOC_TRIM_THRESHOLD_, "
                        "MALLOC_MMAP_THRESHOLD_",
}


# ---------------------------------------------------------------- value checks

# A check: what is wrong with a value, completing "<key> = <value> ...", or None if nothing is.
Check = Callable[[Any], Optional[str]]


def _rule(allowed: str, ok: Callable[[Any], bool]) -> Check:
    return lambda v: None if ok(v) else f"is out of range: must be {allowed}"


POSITIVE = _rule("> 0", lambda v: v > 0)
AT_LEAST_1 = _rule(">= 1", lambda v: v >= 1)
NON_NEGATIVE = _rule(">= 0", lambda v: v >= 0)
PROBABILITY = _rule("in [0, 1]", lambda v: 0 <= v <= 1)
BELOW_1 = _rule("in [0, 1)", lambda v: 0 <= v < 1)
NOT_EMPTY = _rule("not empty", lambda v: len(v) > 0)
AREA_RANGE = _rule("[min, max] with 0 < min <= max <= 1", lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1)

# data.dataset: ours (any spelling below), or one of timm's map-style datasets: torch/<name> for the
# torchvision datasets timm's factory builds, hfds/<name> for Hugging Face datasets. timm's
# streaming kinds cannot be sharded by the samplers in data/.
FASHION_MNIST_NAMES = ("fashion_mnist", "fashion-mnist", "fashionmnist")
IMAGEFOLDER_NAMES = ("imagefolder", "image_folder")
TIMM_STREAMING_PREFIXES = ("hfids", "tfds", "wds")


@functools.lru_cache(maxsize=None)
def timm_builds_torch_dataset(name: str) -> bool:
    """Whether timm's dataset factory builds ``torch/<name>``, asked of the factory itself: given an
    empty directory, a name it builds fails for want of the files, any other name as unknown."""
    with tempfile.TemporaryDirectory() as root:
        try:
            timm_create_dataset(f"torch/{name}", root=root, split="validation", download=False)
        except AssertionError as e:
            return "Unknown torchvision dataset" not in str(e)
        except Exception:  # the dataset class refused the empty directory: timm knows the name
            return True
    return True


def _close_timm_dataset(name: str) -> Optional[str]:
    """The torchvision dataset timm builds that is closest to ``name`` (lower case), if any is close:
    candidates are torchvision's dataset class names (CIFAR10 → cifar10, FashionMNIST → fashionmnist
    and fashion_mnist), each confirmed with timm."""
    names = torchvision.datasets.__all__
    candidates = {n.lower() for n in names} | {re.sub(r"(?<=[a-z])(?=[A-Z])", "_", n).lower() for n in names}
    return next((c for c in difflib.get_close_matches(name, sorted(candidates), n=5) if timm_builds_torch_dataset(c)),
                None)


def dataset_name_problem(name: str) -> Optional[str]:
    """What is wrong with ``data.dataset = name`` (completing "data.dataset = 'name' ..."), or None.
    Prefixes are case-insensitive, as in timm's factory, and so are torch/ names."""
    prefix, slash, rest = name.partition("/")
    prefix, lower = prefix.lower(), name.lower()
    if not slash and lower in FASHION_MNIST_NAMES + IMAGEFOLDER_NAMES:
        return None
    if slash and prefix == "hfds" and rest:
        return None
    if slash and prefix in TIMM_STREAMING_PREFIXES:
        return ("is a streaming (iterable) dataset, which the samplers here cannot shard; use an ImageFolder "
                "copy (imagefolder) or a map-style dataset (torch/<name>, hfds/<name>)")
    if slash and prefix == "torch":
        if rest and timm_builds_torch_dataset(rest.lower()):
            return None
        close = _close_timm_dataset(rest.lower())
        hint = f"; did you mean 'torch/{close}'?" if close else ""
        return f"is not a torchvision dataset timm's factory builds (timm.data.create_dataset){hint}"
    if slash:  # another prefix
        close = [f"{p}/{rest}" for p in difflib.get_close_matches(prefix, ["torch", "hfds"], n=1)]
    elif lower and timm_builds_torch_dataset(lower):
        close = [f"torch/{lower}"]
    else:
        close = difflib.get_close_matches(lower, [FASHION_MNIST_NAMES[0], IMAGEFOLDER_NAMES[0]], n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"is not a known dataset (fashion_mnist | imagefolder | torch/<name> | hfds/<name>){hint}"


# ---------------------------------------------------------------- the schema

@dataclass(frozen=True)
class Key:
    """What the schema says of one key besides its name and type; declared with ``key``."""

    help: str
    choices: Tuple[Any, ...] = ()
    check: Optional[Check] = None
    path: bool = False       # a path: a leading ~ is the home directory, as in the shell
    resumable: bool = False  # a resumed run may change it: paths, throughput knobs, stopping, logging


def key(default: Any, help: str, *, choices: Tuple[Any, ...] = (), check: Optional[Check] = None,
        path: bool = False, resumable: bool = False) -> Any:
    """A config field: ``default`` (a list or mapping is copied for each instance) and its ``Key``.
    A null value skips ``choices`` and ``check``: the type (Optional or not) decides whether it may be null."""
    meta = {"key": Key(help, tuple(choices), check, path, resumable)}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name: str = key("vit_micro_multimax_patch7_28", "a timm model name (ours: models/vision_transformer.py)",
                    check=NOT_EMPTY)
    num_classes: Optional[int] = key(None, "classes of the head; null: the dataset's", check=AT_LEAST_1)
    img_size: int = key(28, "input image size in pixels (square)", check=AT_LEAST_1)
    patch_size: Optional[int] = key(None, "patch size; null: the registered model's", check=AT_LEAST_1)
    in_chans: Optional[int] = key(None, "input channels; null: the dataset's", check=AT_LEAST_1)
    # train.py records the normalizers it built in the run's config.yaml
    attn_normalizer: Optional[str] = key(None, "attention normalizer; null: the model name's (*_multimax_*: "
                                         "multimax, *_gap_*: softmax)", choices=NORMALIZERS)
    out_normalizer: Optional[str] = key(None, "output normalizer; null: the model name's", choices=OUT_NORMALIZERS)
    modulator_order: int = key(2, "SegLU order N of every modulator", check=AT_LEAST_1)
    modulator_init: str = key("trunc_normal", "SegLU init: truncated normal, std 0.02 (the paper's), or zeros "
                              "(σ = identity)", choices=MODULATOR_INITS)
    modulator_affine: bool = key(False, "x -> t*x + b before σ in the attention modulators (the authors' later "
                                        "variant)")
    softmax_temperature: float = key(1.0, "temperature of the softmax attention normalizer", check=POSITIVE)
    qkv_bias: bool = key(False, "bias in the qkv projection (the paper's code has none)")
    attn_backend: str = key("auto", "attention kernel (which runs where: docs/PERFORMANCE.md)", choices=ATTN_BACKENDS,
                            resumable=True)
    # Dropout as timm 1.x names it. The paper's (and DeiT's) `drop_rate` is pos_drop_rate and
    # proj_drop_rate at one value; timm 1.x's drop_rate is the head dropout, which the paper's code lacks.
    drop_rate: float = key(0.0, "dropout before the classifier head", check=PROBABILITY)
    pos_drop_rate: float = key(0.0, "dropout after adding the position embedding", check=PROBABILITY)
    proj_drop_rate: float = key(0.0, "dropout after the attention projection and in the MLP", check=PROBABILITY)
    attn_drop_rate: float = key(0.0, "dropout on the attention probabilities", check=PROBABILITY)
    drop_path_rate: float = key(0.1, "stochastic depth: the last block's drop probability", check=PROBABILITY)
    grad_checkpointing: bool = key(False, "recompute each block in the backward pass (less memory)", resumable=True)
    init_checkpoint: str = key("", "weights to start from, a file or URL (models.load_weights); '': none", path=True)
    kwargs: Dict[str, Any] = key({}, "extra timm.create_model kwargs")


@dataclass
class DataConfig:
    dataset: str = key("fashion_mnist", "fashion_mnist | imagefolder | torch/<name> | hfds/<name> (timm's factory)",
                       check=dataset_name_problem)
    root: str = key("", "dataset directory; fashion_mnist: '' = Debian's package or the user cache", path=True,
                    resumable=True)
    train_split: str = key("train", "the split to train on")
    val_split: str = key("val", "the split to evaluate on")
    download: bool = key(False, "fetch a missing dataset (fashion_mnist, torch/<name>)")
    batch_size: int = key(128, "images per process and step", check=AT_LEAST_1)
    eval_batch_size: Optional[int] = key(None, "null: 1.5 x batch_size (DeiT)", check=AT_LEAST_1, resumable=True)
    workers: int = key(8, "data loading processes per training process", check=NON_NEGATIVE, resumable=True)
    pin_memory: bool = key(True, "page-locked batches (faster copies to the GPU)", resumable=True)
    train_transform: str = key("deit", "training augmentation: deit (timm's, the recipe's), light (random crop + "
                                       "flip) or none",
                               choices=("deit", "light", "none"))
    scale: List[float] = key([0.08, 1.0], "random resized crop: the area's range", check=AREA_RANGE)
    ratio: List[float] = key([3.0 / 4.0, 4.0 / 3.0], "random resized crop: the aspect ratio's range",
                             check=_rule("[min, max] with 0 < min <= max", lambda v: len(v) == 2 and 0 < v[0] <= v[1]))
    hflip: float = key(0.5, "horizontal flip probability", check=PROBABILITY)
    color_jitter: float = key(0.3, "color jitter strength", check=NON_NEGATIVE)
    auto_augment: str = key("rand-m9-mstd0.5-inc1", "timm's auto-augment policy; '' disables it")
    interpolation: str = key("bicubic", "resize interpolation",
                             choices=("bicubic", "bilinear", "nearest", "box", "hamming", "lanczos", "random"))
    crop_pct: float = key(0.875, "evaluation: the center crop's share of the resized image",
                          check=_rule("in (0, 1]", lambda v: 0 < v <= 1))
    mean: Optional[List[float]] = key(None, "per-channel mean; null: the dataset's", check=NOT_EMPTY)
    std: Optional[List[float]] = key(None, "per-channel std; null: the dataset's", check=_rule(
        "a list of numbers > 0", lambda v: len(v) > 0 and all(s > 0 for s in v)))
    reprob: float = key(0.25, "random erasing probability", check=PROBABILITY)
    remode: str = key("pixel", "random erasing mode (timm's)", choices=("pixel", "rand", "const"))
    recount: int = key(1, "random erasing count", check=AT_LEAST_1)
    repeated_aug: int = key(3, "copies of each image per epoch, one per process (at most the process count: off on "
                               "one process, as in DeiT); 1 disables it", check=AT_LEAST_1)
    mixup: float = key(0.8, "mixup alpha; 0 disables it", check=NON_NEGATIVE)
    cutmix: float = key(1.0, "cutmix alpha; 0 disables it", check=NON_NEGATIVE)
    cutmix_minmax: Optional[List[float]] = key(None, "cutmix box size range (instead of the alpha)", check=AREA_RANGE)
    mixup_prob: float = key(1.0, "probability of mixup or cutmix per batch", check=PROBABILITY)
    mixup_switch_prob: float = key(0.5, "probability of cutmix instead of mixup when both are on", check=PROBABILITY)
    mixup_mode: str = key("batch", "mixup parameters per batch, pair or element (timm's)",
                          choices=("batch", "pair", "elem"))
    smoothing: float = key(0.1, "label smoothing", check=BELOW_1)
    bad_images: str = key("error", "an unreadable image: stop naming it, or skip it", choices=("error", "skip"))
    max_train_samples: Optional[int] = key(None, "train on this many images, evenly spaced (smoke runs)",
                                           check=AT_LEAST_1)
    max_val_samples: Optional[int] = key(None, "evaluate on this many images, evenly spaced", check=AT_LEAST_1)


@dataclass
class OptimConfig:
    opt: str = key("adamw", "the optimizer (the DeiT recipe's)", choices=("adamw",))
    lr: float = key(5e-4, "peak lr for lr_base_batch images per step", check=POSITIVE)
    lr_base_batch: int = key(512, "the global batch optim.lr is given for", check=AT_LEAST_1)
    scale_lr: bool = key(True, "lr x global batch / lr_base_batch (DeiT)")
    weight_decay: float = key(0.05, "AdamW weight decay (matrices only)", check=NON_NEGATIVE)
    betas: List[float] = key([0.9, 0.999], "AdamW betas",
                             check=_rule("two numbers in [0, 1)", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v)))
    eps: float = key(1e-8, "AdamW eps", check=POSITIVE)
    clip_grad: Optional[float] = key(None, "clip the global gradient norm to this; null: no clipping", check=POSITIVE)
    sched: str = key("cosine", "lr schedule: cosine_epoch is DeiT's (timm's cosine stepped once per epoch), "
                     "cosine is per step, constant follows a per-step warmup",
                     choices=("cosine_epoch", "cosine", "constant"))
    warmup_epochs: float = key(5.0, "linear warmup from warmup_lr, in epochs", check=NON_NEGATIVE)
    warmup_lr: float = key(1e-6, "lr at the start of the warmup", check=NON_NEGATIVE)
    min_lr: float = key(1e-5, "lr at the end of the cosine", check=NON_NEGATIVE)


@dataclass
class TrainConfig:
    epochs: int = key(300, "epochs to train", check=AT_LEAST_1)
    output_dir: str = key("runs/default", "the run directory", check=NOT_EMPTY, path=True, resumable=True)
    seed: int = key(0, "seed of the weights, data order and augmentation")
    device: str = key("auto", "the device: auto picks a GPU when there is one", choices=("auto", "cpu", "cuda"),
                      resumable=True)
    amp: str = key("none", "mixed precision", choices=("none", "bf16", "fp16"))
    accum_steps: int = key(1, "micro-batches per optimizer step", check=AT_LEAST_1)
    compile: bool = key(False, "torch.compile the model", resumable=True)
    ema: bool = key(False, "keep an EMA of the weights, evaluated with the model")
    ema_decay: float = key(0.99996, "EMA decay per optimizer step", check=BELOW_1)
    resume: str = key("auto", "auto (the run directory's last.pth) | none (start over) | <path>", check=NOT_EMPTY,
                      path=True, resumable=True)
    keep_top_k: int = key(3, "best checkpoints kept, by val_top1", check=NON_NEGATIVE, resumable=True)
    eval_every: int = key(1, "evaluate every N epochs (and after the last)", check=AT_LEAST_1)
    log_every: int = key(50, "optimizer steps between log lines (the loop's host reads)", check=AT_LEAST_1,
                         resumable=True)
    nonfinite: str = key("stop", "a non-finite loss or gradient: stop, or skip the step", choices=("stop", "skip"))
    max_consecutive_skips: int = key(100, "stop after this many skipped steps in a row (any policy, fp16 "
                                          "overflows too)", check=AT_LEAST_1, resumable=True)
    tf32: bool = key(True, "CUDA float32 matmuls on TF32 tensor cores (Ampere+); CPU unaffected", resumable=True)
    tensorboard: bool = key(True, "TensorBoard event files in <output_dir>/tensorboard", resumable=True)
    log_modulators: bool = key(True, "every modulator's parameters to TensorBoard after each epoch", resumable=True)
    plot_modulators: bool = key(False, "with log_modulators: a figure of their curves too", resumable=True)
    allow_config_change: bool = key(False, "resume a run whose config.yaml differs in keys that change results",
                                    resumable=True)
    max_steps_per_epoch: Optional[int] = key(None, "at most this many optimizer steps per epoch (smoke runs)",
                                             check=AT_LEAST_1)
    stop_after_epochs: Optional[int] = key(None, "end this job after N epochs, exit 75 (rerun to resume)", check=AT_LEAST_1,
                                           resumable=True)
    dist_backend: str = key("auto", "torch.distributed backend", choices=("auto", "nccl", "gloo"), resumable=True)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _declared(cls: type = Config, prefix: str = "") -> Iterator[Tuple[str, dataclasses.Field]]:
    """(dotted key, field) of every key of the schema, sections included, in declaration order."""
    for f in dataclasses.fields(cls):
        yield prefix + f.name, f
        if dataclasses.is_dataclass(_hints(cls)[f.name]):
            yield from _declared(_hints(cls)[f.name], f"{prefix}{f.name}.")


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


# Every key's declaration by dotted name (sections have none)
KEYS: Dict[str, Key] = {dotted: f.metadata["key"] for dotted, f in _declared() if "key" in f.metadata}
_ALL_KEYS = tuple(dotted for dotted, _ in _declared())  # sections too: what an unknown key may have meant


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


def dump_config(cfg: Config, help: bool = False) -> str:
    """YAML text that ``load_config``/``config_from_yaml_text`` read back to an equal Config;
    ``help``: with each key's help and choices as a comment (``train.py --print-config``)."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    return _with_help(text.splitlines()) if help else text


def _with_help(lines: List[str]) -> str:
    """``dump_config``'s lines with a comment for each key: after its value where that ends on the key's
    line (the next line is another key), else on a line of its own above the key."""
    out, section = [], ""
    for i, line in enumerate(lines):
        name = re.match(r"(  )?(\w+):", line)
        if not name:
            out.append(line)
            continue
        if not name.group(1):
            section = name.group(2)
            out.append(line)
            continue
        spec = KEYS[f"{section}.{name.group(2)}"]
        note = f"# {spec.help}" + (f" ({' | '.join(map(str, spec.choices))})" if spec.choices else "")
        ends_here = i + 1 == len(lines) or re.match(r"(  )?\w+:", lines[i + 1])
        out += [f"{line}  {note}"] if ends_here else [f"  {note}", line]
    return "\n".join(out) + "\n"


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
        if text.strip().startswith("~") and _is_path(key):
            value = text.strip()  # a home-relative path (YAML would read a bare ~ as null)
        for part in reversed(key.split(".")):
            value = {part: value}
        _merge(cfg, value, "", CLI, sources)


# ---------------------------------------------------------------- keys and types

def _is_path(dotted: str) -> bool:
    return dotted in KEYS and KEYS[dotted].path


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
            guess = [k for k in _ALL_KEYS if k.rsplit(".", 1)[-1] == leaf] or \
                difflib.get_close_matches(dotted, _ALL_KEYS, n=1)
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
            hint = " (a bare ~ is YAML's null: quote it, '~')" if _is_path(dotted) and value is None else ""
            raise UserError(f"{source}: {dotted} expects {_type_name(hints[key])}, got {value!r}{hint}") from None
        setattr(node, key, os.path.expanduser(value) if _is_path(dotted) and value else value)
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


# ---------------------------------------------------------------- values

def validate(cfg: Config, sources: Optional[Dict[str, str]] = None) -> None:
    """Check every key's value against its declaration (``choices``, ``check``), and what spans keys;
    the UserError names the key, its value, what is allowed and (from ``sources``, dotted key → file
    or command line) where the value was set."""
    sources = sources or {}

    def where(dotted: str) -> str:
        source = sources.get(dotted)
        return " (the default)" if source is None else " (set on the command line)" if source == CLI \
            else f" (set in {source})"

    for dotted, spec in KEYS.items():
        section, name = dotted.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is None:
            continue
        problem = (choice_problem(value, spec.choices) if spec.choices else None) or (spec.check and spec.check(value))
        if problem:
            raise UserError(f"{dotted} = {value!r} {problem}{where(dotted)}")
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
