"""scripts/attention_maps.py: rollout math, and the script on tiny checkpoints."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import dump_config, load_config
from engine.model import build_model
from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
from attention_maps import rollout  # noqa: E402


def test_rollout_rows_are_distributions_and_identity_attention_is_identity():
    torch.manual_seed(0)
    probs = [torch.softmax(torch.randn(2, 5, 5), -1) for _ in range(3)]
    r = rollout(probs)
    torch.testing.assert_close(r.sum(-1), torch.ones(5, dtype=torch.float64))
    eye = [torch.eye(5).expand(2, 5, 5) for _ in range(3)]
    torch.testing.assert_close(rollout(eye), torch.eye(5, dtype=torch.float64))
    # one layer of uniform attention: (U + I) / 2
    uniform = [torch.full((1, 4, 4), 0.25)]
    torch.testing.assert_close(rollout(uniform), (torch.full((4, 4), 0.25) + torch.eye(4)).double() / 2)


def _checkpoint(tmp_path, name, normalizer):
    cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"),
                      ["model.kwargs.depth=2", "model.kwargs.embed_dim=32", "model.kwargs.num_heads=2",
                       f"model.attn_normalizer={normalizer}"])
    model = build_model(cfg.model, 10, 1)
    path = tmp_path / name
    torch.save({"model": model.state_dict(), "config": dump_config(cfg), "format_version": 1}, path)
    return path


def test_script_writes_png_and_compares(tmp_path):
    mm = _checkpoint(tmp_path, "mm.pth", "multimax")
    sm = _checkpoint(tmp_path, "sm.pth", "softmax")
    img = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(0).random((28, 28)) * 255).astype(np.uint8)).save(img)
    out = tmp_path / "maps.png"
    run = lambda *a: subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "attention_maps.py"), *map(str, a)],
                                    capture_output=True, text=True, timeout=120, cwd=ROOT)
    proc = run("--checkpoint", mm, "--compare", sm, "--image", img, "--query", 1, 2, "--out", out, "--pdf")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.stat().st_size > 1000 and (tmp_path / "maps.pdf").exists()
    bad = run("--checkpoint", mm, "--image", img, "--query", 9, 0, "--out", out)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("attention_maps.py: error:") and "patch grid" in bad.stderr
    assert "Traceback" not in bad.stderr
    missing = run("--checkpoint", tmp_path / "nope.pth", "--out", out)
    assert missing.returncode == 2 and "nope.pth" in missing.stderr
