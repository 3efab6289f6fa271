"""Typed run configuration: defaults → YAML file (with `_base_`) → dotted CLI overrides.

SCHEMA ONLY (loader to be written): the dataclasses below are the contract that
train.py, eval.py, data/ and engine/ code against.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class ModelConfig:
    name: str = "vit_micro_multimax_patch7_28"
    num_classes: Optional[int] = None          # None: taken from the dataset
    img_size: int = 28
    patch_size: Optional[int] = None           # None: the registered model's
    in_chans: Optional[int] = None             # None: taken from the dataset
    attn_normalizer: str = "multimax"          # softmax | multimax | sparsemax | entmax15 | evsoftmax
    out_normalizer: str = "multimax"           # softmax | multimax
    modulator_order: int = 2
    modulator_init: str = "trunc_normal"       # trunc_normal | zeros
    modulator_affine: bool = False             # x -> t*x + b before sigma (authors' later variant)
    softmax_temperature: float = 1.0
    qkv_bias: bool = False                     # the paper's code has none
    attn_backend: str = "auto"                 # auto | sdpa | explicit | flex | chunked
    drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    grad_checkpointing: bool = False
    init_checkpoint: str = ""                  # weights to start from (models.load_weights)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs


@dataclass
class DataConfig:
    dataset: str = "fashion_mnist"             # fashion_mnist | imagefolder | a timm dataset name
    root: str = ""
    train_split: str = "train"
    val_split: str = "val"
    download: bool = False
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
    repeated_aug: int = 3                      # 1 disables repeated augmentation
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
    sched: str = "cosine"                      # cosine | constant
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
    log_modulators: bool = True
    plot_modulators: bool = False
    allow_config_change: bool = False
    max_steps_per_epoch: Optional[int] = None  # smoke runs
    dist_backend: str = "auto"                 # auto | nccl | gloo


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
