"""SegLU / MultiMax and the baseline normalizers against direct formulas and hand-computed values."""
import math

import pytest
import torch

from models.multimax import (
    NORMALIZERS, SegLU, build_normalizer, entmax15, evsoftmax, multimax, seglu, softmax, sparsemax,
)


def sigma_reference(x: torch.Tensor, ranges, ts) -> torch.Tensor:
    """σ written out term by term in float64, straight from the paper's formula."""
    out = x.clone()
    order = len(ranges) // 2
    for n in range(1, order + 1):
        b, d = ranges[2 * (n - 1)], ranges[2 * (n - 1) + 1]
        tb, td = ts[2 * (n - 1)], ts[2 * (n - 1) + 1]
        out = out + tb * torch.clamp(b - x, min=0) ** n + td * torch.clamp(x - d, min=0) ** n
    return out


@pytest.mark.parametrize("order", [1, 2, 3])
def test_seglu_matches_formula_including_non_monotone(order):
    gen = torch.Generator().manual_seed(order)
    x = torch.linspace(-6, 6, 241, dtype=torch.float64)
    # large, mixed-sign parameters: σ is then non-monotone (e.g. negative slopes beyond d)
    ranges = torch.randn(2 * order, generator=gen, dtype=torch.float64) * 2
    ts = torch.randn(2 * order, generator=gen, dtype=torch.float64) * 1.5
    ts[1] = -3.0  # slope 1 + ts[1] < 0 to the right of d1: non-monotone
    got = seglu(x, ranges, ts)
    want = sigma_reference(x, ranges.tolist(), ts.tolist())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert (got.diff() < 0).any(), "parameters were meant to make σ non-monotone"


def test_seglu_module_layout_and_init():
    m = SegLU(order=2)
    assert m.ranges.shape == (4,) and m.ts.shape == (4,)
    assert 0 < m.ranges.abs().max() <= 0.2 and m.ts.std() < 0.1  # trunc_normal std 0.02
    z = SegLU(order=3, init="zeros")
    assert torch.equal(z.ranges, torch.zeros(6)) and torch.equal(z.ts, torch.zeros(6))
    with pytest.raises(ValueError, match="order"):
        SegLU(order=0)


def test_zero_parameters_give_exactly_softmax():
    x = torch.randn(5, 17) * 4
    zeros = torch.zeros(4)
    assert torch.equal(multimax(x, zeros, zeros), torch.softmax(x, -1))
    mm = build_normalizer("multimax", order=2, init="zeros")
    assert torch.equal(mm(x), torch.softmax(x, -1))


def test_multimax_is_softmax_of_sigma():
    x = torch.randn(3, 8, dtype=torch.float64)
    r, t = torch.tensor([-0.5, 0.7, -1.0, 1.2]), torch.tensor([0.3, 0.4, -0.1, 0.05])
    want = torch.softmax(sigma_reference(x, r.tolist(), t.tolist()), -1)
    torch.testing.assert_close(multimax(x, r.double(), t.double()), want)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_gradcheck_seglu_and_multimax(order):
    gen = torch.Generator().manual_seed(10 + order)
    # keep inputs away from the kinks (where relu is not differentiable)
    x = (torch.rand(4, 6, generator=gen, dtype=torch.float64) * 4 - 2).requires_grad_()
    ranges = torch.tensor([0.31, -0.27, 0.53, -0.61, 0.17, -0.43][: 2 * order], dtype=torch.float64, requires_grad=True)
    ts = torch.tensor([0.2, -0.3, 0.15, 0.1, -0.05, 0.07][: 2 * order], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(seglu, (x, ranges, ts))
    assert torch.autograd.gradcheck(lambda a, b, c: multimax(a, b, c), (x, ranges, ts))


def test_sparsemax_hand_computed():
    p = sparsemax(torch.tensor([[-2.0, 0.0, 0.5]]))
    torch.testing.assert_close(p, torch.tensor([[0.0, 0.25, 0.75]]))


def test_entmax15_hand_computed():
    # 1.5-entmax: p_i = [x_i / 2 - tau]_+^2 with tau such that the p_i sum to 1.
    # For x = (1, 0, -3) the support is {0, 1}: (0.5 - tau)^2 + tau^2 = 1, tau = (1 - sqrt 7) / 4.
    x = torch.tensor([[1.0, 0.0, -3.0]])
    tau = (1 - math.sqrt(7)) / 4
    want = torch.tensor([[(0.5 - tau) ** 2, (0.0 - tau) ** 2, 0.0]])
    torch.testing.assert_close(entmax15(x), want, rtol=1e-5, atol=1e-6)


def test_evsoftmax_hand_computed():
    x = torch.tensor([[2.0, 1.0, -3.0]])  # mean 0: the last entry is dropped
    e = torch.exp(torch.tensor([2.0, 1.0]))
    want = torch.tensor([[e[0] / e.sum(), e[1] / e.sum(), 0.0]])
    torch.testing.assert_close(evsoftmax(x), want)
    train = evsoftmax(x, training=True)
    assert 0 < train[0, 2] < 1e-6 and torch.isclose(train.sum(), torch.tensor(1.0))


def test_softmax_temperature():
    x = torch.tensor([[1.0, 2.0, 4.0]])
    torch.testing.assert_close(softmax(x, temperature=2.0), torch.softmax(x / 2, -1))


@pytest.mark.parametrize("name", NORMALIZERS)
def test_every_normalizer_sums_to_one(name):
    norm = build_normalizer(name, order=2, temperature=0.7)
    x = torch.randn(2, 3, 11, 11) * 3
    for training in (True, False):
        norm.train(training)
        p = norm(x)
        assert p.shape == x.shape and (p >= 0).all()
        torch.testing.assert_close(p.sum(-1), torch.ones(2, 3, 11))


@pytest.mark.parametrize("name", NORMALIZERS)
def test_additive_mask_applied_after_modulator(name):
    norm = build_normalizer(name)
    x = torch.randn(4, 6)
    bias = torch.zeros(4, 6)
    bias[:, -2:] = float("-inf")
    p = norm(x, bias)
    assert torch.equal(p[:, -2:], torch.zeros(4, 2))
    torch.testing.assert_close(p.sum(-1), torch.ones(4))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_keeps_float32_math_and_finite(dtype):
    x = torch.linspace(-100, 100, 64).reshape(2, 32)
    r, t = torch.tensor([-0.5, 0.5, -1.0, 1.0]), torch.tensor([0.05, 0.05, 0.02, 0.02])
    with torch.autocast("cpu", dtype=dtype):
        p = multimax(x.to(dtype), r, t)
        y = SegLU()(x.to(dtype))
    assert p.dtype == dtype and y.dtype == dtype
    assert torch.isfinite(p.float()).all() and torch.isfinite(y.float()).all()
    ref = multimax(x.to(dtype).float(), r, t)
    torch.testing.assert_close(p.float(), ref, atol=1e-2, rtol=1e-2)
