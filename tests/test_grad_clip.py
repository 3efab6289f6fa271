"""Gradient clipping (optim.clip_grad): the SegLU modulators are clipped in their own group, so the
output σ's gradient (summed over every class) does not set the backbone's clip factor; without
clipping the training step is what it always was."""
import timm
import torch
import torch.nn.functional as F

import models  # noqa: F401  (registers the micro models with timm)
from engine.config import OptimConfig, TrainConfig
from engine.distributed import DistInfo
from engine.loop import Trainer, TrainState, build_criterion, grad_norm_
from engine.optim import build_optimizer, clip_groups
from models.multimax import modulators


def _micro(num_classes=10, name="vit_micro_multimax_patch7_28", **size):
    torch.manual_seed(0)
    size = size or {"embed_dim": 32, "depth": 2, "num_heads": 2}
    return timm.create_model(name, num_classes=num_classes, in_chans=1, **size)


def _backward(model, num_classes, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, num_classes, (16,), generator=g)
    F.cross_entropy(model(x), y, label_smoothing=0.1).backward()


def _norm(params):
    return float(torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in params])))


def test_clip_groups_split_the_modulators_from_the_rest_in_model_order():
    model = _micro()
    rest, own = clip_groups(model)
    seglu = [p for m in modulators(model).values() for p in m.parameters()]
    assert len(seglu) == 2 * 3 and {id(p) for p in own} == {id(p) for p in seglu}   # 2 blocks + the output σ
    order = {id(p): i for i, p in enumerate(model.parameters())}
    for group in (rest, own):
        assert [order[id(p)] for p in group] == sorted(order[id(p)] for p in group)
    assert len(rest) + len(own) == len(list(model.parameters()))
    gap = _micro(name="vit_micro_gap_patch7_28")
    assert [[id(p) for p in g] for g in clip_groups(gap)] == [[id(p) for p in gap.parameters()]]


def test_with_clip_grad_the_modulators_no_longer_set_the_backbones_clip_factor():
    """1000 classes and the confident logits of a trained classifier (the head scaled up): the
    output σ's gradient norm is several times the whole backbone's. One global norm would scale
    the backbone down by that much more; in their own group the backbone is clipped as if there
    were no modulators, and the modulators to the same bound."""
    classes, clip = 1000, 1.0
    model = _micro(classes, depth=4)  # the registered micro size, 4 blocks
    with torch.no_grad():
        model.head.weight.mul_(100)
    _backward(model, classes)
    rest, own = clip_groups(model)
    rest_norm, own_norm = _norm(rest), _norm(own)
    assert own_norm > 4 * rest_norm > 4 * clip                     # the modulators dominate the global norm
    total = (rest_norm ** 2 + own_norm ** 2) ** 0.5
    alone = [p.grad.clone() for p in rest]
    reference = [torch.nn.Parameter(torch.zeros_like(g)) for g in alone]
    for p, g in zip(reference, alone):
        p.grad = g
    torch.nn.utils.clip_grad_norm_(reference, clip, foreach=True)  # the backbone clipped on its own

    norm = grad_norm_([rest, own], clip)
    torch.testing.assert_close(float(norm), total, rtol=1e-5, atol=0)  # the logged norm: all gradients, before
    assert all(torch.equal(p.grad, r.grad) for p, r in zip(rest, reference))
    assert abs(_norm(rest) - clip) < 1e-4 and abs(_norm(own) - clip) < 1e-4
    # what one global norm would have left the backbone: clip / total of it, over 4x less
    assert _norm(rest) > 4 * rest_norm * clip / total


def _old_grad_norm(groups, clip):
    """The norm of the unchanged path without clipping: every gradient in the model's order."""
    assert clip is None
    grads = [p.grad for group in groups for p in group if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def _train(monkeypatch, train, reference):
    if reference:
        monkeypatch.setattr("engine.loop.grad_norm_", _old_grad_norm)
    model = _micro()
    optimizer = build_optimizer(model, OptimConfig(), lr=1e-3)
    info = DistInfo(0, 1, 0, torch.device("cpu"), True, "none", False)
    trainer = Trainer(model=model, optimizer=optimizer, criterion=build_criterion(False, 0.1),
                      lr_schedule=lambda step: 1e-3, state=TrainState(), info=info, train=train, optim=OptimConfig())
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(6)]
    result = trainer.train_one_epoch(batches, epoch=0)
    monkeypatch.undo()
    return trainer, result


def test_without_clip_grad_training_is_bit_identical_to_the_unchanged_norm(monkeypatch):
    train = TrainConfig(log_every=3)
    trainer, result = _train(monkeypatch, train, reference=False)
    assert [[id(p) for p in g] for g in trainer.grad_groups] == [[id(p) for p in trainer.model.parameters()]]
    ref_trainer, ref_result = _train(monkeypatch, train, reference=True)
    assert result.stats["grad_norm"] == ref_result.stats["grad_norm"]
    assert result.stats["train_loss"] == ref_result.stats["train_loss"]
    for a, b in zip(trainer.model.state_dict().values(), ref_trainer.model.state_dict().values()):
        assert torch.equal(a, b)
    # and the norm alone leaves the gradients untouched
    model = _micro()
    _backward(model, 10)
    before = [p.grad.clone() for p in model.parameters()]
    assert torch.equal(grad_norm_([list(model.parameters())], None), _old_grad_norm([list(model.parameters())], None))
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))


def test_the_trainer_clips_each_group_before_the_update(monkeypatch):
    """What AdamW sees under optim.clip_grad: the backbone's and the modulators' gradients, each at
    most the clip norm."""
    seen = []
    original = torch.optim.AdamW.step

    def step(self, *a, **k):
        rest, own = clip_groups(model)
        seen.append((_norm(rest), _norm(own)))
        return original(self, *a, **k)

    model = _micro()
    optimizer = build_optimizer(model, OptimConfig(), lr=1e-3)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    info = DistInfo(0, 1, 0, torch.device("cpu"), True, "none", False)
    clip = 1e-3
    trainer = Trainer(model=model, optimizer=optimizer, criterion=build_criterion(False, 0.1),
                      lr_schedule=lambda s: 1e-3, state=TrainState(), info=info, train=TrainConfig(log_every=2),
                      optim=OptimConfig(clip_grad=clip))
    g = torch.Generator().manual_seed(2)
    trainer.train_one_epoch([(torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g))
                             for _ in range(2)], epoch=0)
    assert len(seen) == 2 and all(r <= clip * (1 + 1e-4) and m <= clip * (1 + 1e-4) for r, m in seen), seen
    assert all(r > 0.5 * clip for r, _ in seen)  # clipped down to the bound, not zeroed
