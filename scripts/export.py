#!/usr/bin/env python
"""Export a checkpoint's model weights to safetensors (no pickle), with the model config.

    python scripts/export.py runs/quickstart/best.pth --out exported/ [--use-ema]

Writes ``<out>/model.safetensors`` (the config YAML is also stored in its metadata under
``config``) and ``<out>/config.yaml``. ``eval.py --checkpoint <out>/model.safetensors`` loads it.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from safetensors.torch import save_file  # noqa: E402

from engine.checkpoint import load_checkpoint  # noqa: E402
from engine.errors import UserError  # noqa: E402
from models.weights import CheckpointMismatchError, extract_state_dict  # noqa: E402


def export(checkpoint: str, out_dir: str, use_ema: bool = False) -> str:
    ckpt = load_checkpoint(checkpoint)
    try:
        state = extract_state_dict(ckpt, use_ema=use_ema)
    except CheckpointMismatchError as e:
        raise UserError(f"{checkpoint}: {e}") from None
    config = ckpt.get("config") if isinstance(ckpt.get("config"), str) else ""
    # safetensors wants contiguous tensors that do not share memory
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    try:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "model.safetensors")
        tmp = path + ".tmp"
        save_file(tensors, tmp, metadata={"config": config, "format": "multimax-vit", "use_ema": str(use_ema)})
        os.replace(tmp, path)
        if config:
            with open(os.path.join(out_dir, "config.yaml"), "w") as f:
                f.write(config)
    except OSError as e:
        raise UserError(f"cannot write to {out_dir}: {e.strerror}") from None
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--use-ema", action="store_true", help="export the EMA weights")
    args = p.parse_args(argv)
    try:
        path = export(args.checkpoint, args.out, args.use_ema)
    except UserError as e:
        print(f"export.py: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
