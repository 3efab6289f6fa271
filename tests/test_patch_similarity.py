"""Patch similarity per block (over-smoothing): the math, the recording of block outputs for our
GAP models and timm's class-token ViT, the reduction across ranks, and eval.py's JSON."""
import json
import os
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn as nn

import eval as evaluate_script
import models
from engine.config import dump_config, load_config
from engine.model import build_model
from engine.patch_similarity import PatchSimilarity, patch_similarity
from helpers import ROOT


def _brute_force(tokens, prefix=0):
    """Σ over ordered pairs i ≠ j of cos(h_i, h_j), / N(N−1), image by image, in float64."""
    out = []
    for image in tokens[:, prefix:].double():
        n = image.shape[0]
        cos = nn.functional.cosine_similarity(image[:, None], image[None], dim=-1)
        out.append((cos.sum() - cos.diagonal().sum()) / (n * (n - 1)))
    return torch.stack(out)


def test_similarity_is_the_mean_over_pairs_of_distinct_tokens():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 7, 5, generator=g)
    torch.testing.assert_close(patch_similarity(tokens), _brute_force(tokens))
    # hand-computed: tokens (1, 0), (0, 1), (1, 1): cosines 0, 1/√2, 1/√2 per unordered pair
    hand = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]]])
    torch.testing.assert_close(patch_similarity(hand), torch.tensor([2 ** 0.5 / 3], dtype=torch.float64))
    equal = torch.randn(1, 1, 16, generator=g).expand(2, 9, 16)
    torch.testing.assert_close(patch_similarity(equal), torch.ones(2, dtype=torch.float64))
    # prefix tokens are left out: a class token unlike the equal patch tokens changes nothing
    with_cls = torch.cat([torch.randn(2, 1, 16, generator=g), equal], dim=1)
    torch.testing.assert_close(patch_similarity(with_cls, 1), torch.ones(2, dtype=torch.float64))
    assert patch_similarity(with_cls, 0).max() < 1 - 1e-3
    assert patch_similarity(torch.randn(2, 1, 4, generator=g)).isnan().all()  # one patch: no pairs


class _AllTokensEqual(nn.Module):
    """A block that replaces every patch token by their mean (leaving ``prefix`` tokens alone)."""

    def __init__(self, prefix):
        super().__init__()
        self.prefix = prefix

    def forward(self, x, **kwargs):
        patches = x[:, self.prefix:]
        return torch.cat([x[:, :self.prefix], patches.mean(1, keepdim=True).expand_as(patches)], dim=1)


def _models():
    torch.manual_seed(0)
    ours = timm.create_model("vit_micro_multimax_patch7_28", num_classes=10, in_chans=1)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10, in_chans=1, depth=3)
    return {"ours": (ours, 28, 0), "timm_vit": (vit, 32, 1)}


@pytest.mark.parametrize("name", ["ours", "timm_vit"])
def test_blocks_that_make_all_tokens_equal_give_one_and_random_weights_less(name):
    model, size, prefix = _models()[name]
    model.eval()
    images = torch.randn(4, 1, size, size, generator=torch.Generator().manual_seed(1))
    sim = PatchSimilarity(model)
    assert sim.prefix_tokens == prefix and sim.blocks == [f"blocks.{i}" for i in range(len(model.blocks))]
    with torch.no_grad(), models.record_block_outputs(model) as rec:
        model(images)
    assert rec.prefix_tokens == prefix and rec.tokens["blocks.0"][0].shape[0] == 4
    sim.update(rec)
    random = sim.summary()
    assert random["images"] == 4 and random["prefix_tokens"] == prefix
    assert all(v < 0.99 for v in random["layers"].values()), random

    model.blocks = nn.Sequential(*[_AllTokensEqual(prefix) for _ in model.blocks])
    equal = PatchSimilarity(model)
    with torch.no_grad(), models.record_block_outputs(model) as rec:
        model(images)
    equal.update(rec)
    assert list(equal.summary()["layers"].values()) == pytest.approx([1.0] * len(model.blocks), abs=1e-6)
    with torch.no_grad():
        model(images)  # outside the block nothing is recorded
    assert len(rec.tokens["blocks.0"]) == 1


def test_two_ranks_sum_to_one_pass_and_a_rank_without_images_adds_nothing():
    model, size, _ = _models()["ours"]
    model.eval()
    images = torch.randn(6, 1, size, size, generator=torch.Generator().manual_seed(2))
    whole, first, second, idle = (PatchSimilarity(model) for _ in range(4))
    with torch.no_grad(), models.record_block_outputs(model) as rec:
        for part, acc in ((images, whole), (images[:4], first), (images[4:], second)):
            model(part)
            acc.update(rec)
            rec.tokens.clear()
    first.reduce(lambda t: t + second.sums)
    idle.reduce(lambda t: t + first.sums)
    assert idle.summary()["images"] == 6
    for a, b in zip(idle.summary()["layers"].values(), whole.summary()["layers"].values()):
        assert a == pytest.approx(b, rel=1e-12)
    assert PatchSimilarity(model).summary()["layers"] == {f"blocks.{i}": None for i in range(4)}


# ---------------------------------------------------------------- eval.py

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"),
                      ["model.kwargs.depth=3", "model.kwargs.embed_dim=32", "model.kwargs.num_heads=2",
                       "data.workers=0"])
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("patchsim") / "last.pth"
    torch.save({"model": build_model(cfg.model, 10, 1).state_dict(), "config": dump_config(cfg),
                "format_version": 1}, path)
    return str(path)


def test_eval_json_holds_the_similarity_per_block(checkpoint, fake_fmnist, tmp_path):
    out = tmp_path / "r.json"
    assert evaluate_script.main(["--checkpoint", checkpoint, "--patch-similarity", "--output", str(out),
                                 f"data.root={fake_fmnist}"]) == 0
    res = json.loads(out.read_text())
    sim = res["patch_similarity"]
    assert list(sim["layers"]) == ["blocks.0", "blocks.1", "blocks.2"]
    assert all(-1 <= v <= 1 for v in sim["layers"].values())
    assert sim["images"] == res["num_images"] == 37 and sim["prefix_tokens"] == 0
    assert "attn_stats" not in res
    # with --attn-stats too, limited to one batch: the similarity still covers every image
    out2 = tmp_path / "both.json"
    assert evaluate_script.main(["--checkpoint", checkpoint, "--patch-similarity", "--attn-stats",
                                 "--attn-stats-batches", "1", "--batch-size", "8", "--output", str(out2),
                                 f"data.root={fake_fmnist}"]) == 0
    both = json.loads(out2.read_text())
    assert both["attn_stats"]["layers"]["blocks.0.attn"]["counts"]["rows"] == 8 * 16 * 2  # images x queries x heads
    assert both["patch_similarity"]["images"] == 37
    for a, b in zip(both["patch_similarity"]["layers"].values(), sim["layers"].values()):
        assert a == pytest.approx(b, rel=1e-9)


def test_eval_json_for_a_timm_vit_with_a_class_token(fake_fmnist, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "vit.pth"
    torch.save({"model": timm.create_model("vit_tiny_patch16_224", img_size=32, in_chans=1, num_classes=10,
                                           depth=2).state_dict()}, path)
    out = tmp_path / "vit.json"
    assert evaluate_script.main(["model.kwargs.depth=2", "--checkpoint", str(path), "--model", "vit_tiny_patch16_224",
                                 "--img-size", "32",
                                 "--dataset", "fashion_mnist", "--data-root", fake_fmnist, "--split", "test",
                                 "--crop-pct", "1.0", "--mean", "0.5", "--std", "0.5", "--patch-similarity",
                                 "--output", str(out)]) == 0
    sim = json.loads(out.read_text())["patch_similarity"]
    assert sim["prefix_tokens"] == 1 and list(sim["layers"]) == ["blocks.0", "blocks.1"]


@pytest.mark.slow
def test_eval_two_processes_give_the_one_process_similarity(checkpoint, fake_fmnist, tmp_path):
    """37 images, 4 per process and batch: uneven shards, summed over the ranks."""
    args = ["--checkpoint", checkpoint, "--patch-similarity", "--batch-size", "4", f"data.root={fake_fmnist}"]
    assert evaluate_script.main([*args, "--output", str(tmp_path / "one.json")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(ROOT, "eval.py"), *args, "--output", str(tmp_path / "two.json")],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / f).read_text())["patch_similarity"] for f in ("one.json", "two.json"))
    assert one["images"] == two["images"] == 37
    for a, b in zip(one["layers"].values(), two["layers"].values()):
        assert a == pytest.approx(b, rel=1e-9)
