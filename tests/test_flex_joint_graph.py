"""flex's backward accepts every score_mod the project uses.

On CUDA, Inductor lowers flex's backward from a joint graph that flex's autograd builds
(``create_fw_bw_graph``) and first runs ``validate_joint_graph`` on it, which rejects a captured
tensor that requires grad and is indexed more than once. No GPU is needed to build that graph:
flex's CPU path runs the same autograd when only captured tensors require grad (flex refuses q,
k, v gradients on CPU), so these tests build it there and run Inductor's check on it. They skip
if a torch release moves these internals. flex's eager backward, which gives the captured
tensors' gradients on CPU, differentiates captured tensors from torch 2.14 on (before, a vmap
inside it fails for any captured tensor that requires grad; training never takes that path: it
compiles flex, on CUDA); the test comparing those gradients skips before.
"""
import importlib

import pytest
import torch

from models.attention_kernels import ScoreModulation, flex_score_mod, modulate, modulated_attention
from models.multimax import build_normalizer

# flex on CPU without torch.compile is the point here (its autograd, not its kernels)
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

MODULATIONS = {"order 1": (1, False), "order 2": (2, False), "order 1, affine": (1, True),
               "order 2, affine": (2, True)}


def _flex_internals():
    """flex's autograd module, Inductor's check and flex_attention, or a skip naming what moved."""
    try:
        hop = importlib.import_module("torch._higher_order_ops.flex_attention")
        from torch._inductor.kernel.flex.flex_attention import validate_joint_graph
        from torch.nn.attention.flex_attention import _identity, flex_attention
        hop.create_fw_bw_graph  # noqa: B018 (the function flex's autograd builds the joint graph with)
        torch.ops.flex_lib.zeros_and_scatter  # noqa: B018 (the op the check looks at)
    except (ImportError, AttributeError, RuntimeError) as e:
        pytest.skip(f"flex attention internals moved in torch {torch.__version__}: {e}")
    return hop, validate_joint_graph, flex_attention, _identity


def _modulation(order, affine):
    """A MultiMax modulation far from the identity, its parameters requiring grad."""
    norm = build_normalizer("multimax", order, "zeros", affine)
    g = torch.Generator().manual_seed(order + 10 * affine)
    with torch.no_grad():
        for p in norm.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.6)
    return ScoreModulation.of(norm)


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, 32, 8, generator=g) for _ in range(3)]  # no grad: flex's CPU path allows it


def _joint_graphs_of_flex_backward(monkeypatch, score_mod, scale=0.3):
    """Run flex's forward on CPU, its captured tensors requiring grad; return the joint graphs its
    autograd built for the backward (dynamo may trace more than once), as Inductor receives them
    (dead code removed), and flex's output."""
    hop, _, flex_attention, _ = _flex_internals()
    graphs = []
    build = hop.create_fw_bw_graph

    def recording(*args, **kwargs):
        fw, joint = build(*args, **kwargs)
        graphs.append(joint)
        return fw, joint

    monkeypatch.setattr(hop, "create_fw_bw_graph", recording)
    q, k, v = _qkv()
    out = flex_attention(q, k, v, score_mod=score_mod, scale=scale)
    assert graphs, "flex's autograd built no joint graph"
    for g in graphs:
        g.graph.eliminate_dead_code()
    return [g.graph for g in graphs], out


def _indexing_score_mod(params):
    """The score_mod as first written: captures (2N,) tensors and indexes each several times."""
    def score_mod(score, b, h, q_idx, kv_idx):
        return modulate(score, params)
    return score_mod


@pytest.mark.parametrize("case", MODULATIONS)
def test_flex_backward_joint_graph_passes_inductors_check(monkeypatch, case):
    validate = _flex_internals()[1]
    mod = _modulation(*MODULATIONS[case])
    graphs, _ = _joint_graphs_of_flex_backward(monkeypatch, flex_score_mod(mod.params))
    for graph in graphs:
        validate(graph)  # raises NotImplementedError for a score_mod Inductor cannot lower


@pytest.mark.skipif(tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 14),
                    reason="flex's eager backward differentiates captured tensors from torch 2.14 on")
@pytest.mark.parametrize("case", MODULATIONS)
def test_flex_gradients_through_the_unbound_parameters_equal_explicit(case):
    flex_attention = _flex_internals()[2]
    mod = _modulation(*MODULATIONS[case])
    q, k, v = _qkv()
    out = flex_attention(q, k, v, score_mod=flex_score_mod(mod.params), scale=0.3)
    grads = torch.autograd.grad(out, mod.params, torch.ones_like(out))
    ref = modulated_attention(q, k, v, mod, 0.3)
    for got, want in zip(grads, torch.autograd.grad(ref, mod.params, torch.ones_like(ref))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_indexing_score_mod_is_rejected_by_inductors_check(monkeypatch):
    """The control: the score_mod that indexes the captured (2N,) tensors fails the same check."""
    validate = _flex_internals()[1]
    mod = _modulation(2, False)
    graphs, _ = _joint_graphs_of_flex_backward(monkeypatch, _indexing_score_mod(mod.params))
    for graph in graphs:
        with pytest.raises(NotImplementedError, match="multiple indexing"):
            validate(graph)


def test_softmax_with_temperature_has_no_score_mod():
    """Softmax folds its temperature into flex's scale: flex runs its own identity score_mod,
    whose joint graph (nothing captured) passes the check."""
    hop, validate, _, identity = _flex_internals()
    norm = build_normalizer("softmax", temperature=0.7)
    mod = ScoreModulation.of(norm)
    assert flex_score_mod(mod.params) is None and mod.scale_factor == pytest.approx(1 / 0.7)
    example = (torch.zeros((), requires_grad=True), *(torch.zeros((), dtype=torch.int) for _ in range(4)))
    _, joint = hop.create_fw_bw_graph(identity, example, ())
    validate(joint.graph)
