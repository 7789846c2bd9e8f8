"""The memory layer: causal conv, unit-norm q/k, gate ranges, per-chunk gates, wiring, state."""
import pytest
import torch
import torch.nn.functional as F

from titans_pretrain.models.memory import CausalDepthwiseConv, MemoryLayer
from titans_pretrain.models.memory_ops import init_state, memory_read, memory_recurrent

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def _fp64():
    """fp64 everywhere in this module, so comparisons can be tight; restored afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _layer(make_config, **kw) -> MemoryLayer:
    torch.manual_seed(0)
    return MemoryLayer(make_config("lmm", **kw)).double()


def test_causal_conv_matches_left_padded_formula_and_is_causal():
    torch.manual_seed(0)
    conv = CausalDepthwiseConv(5, 4).double()
    x = torch.randn(2, 11, 5)
    y, tail = conv(x)
    w = conv.weight[:, 0, :]  # (C, K): tap K-1 multiplies the current input
    padded = torch.cat((torch.zeros(2, 3, 5), x), dim=1)
    ref = torch.stack([(padded[:, t:t + 4] * w.T).sum(1) for t in range(11)], dim=1)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tail, x[:, -3:])
    # changing input t changes no output before t, and does change output t
    for t in (0, 5, 10):
        x2 = x.clone()
        x2[:, t] += 1.0
        y2, _ = conv(x2)
        assert torch.equal(y2[:, :t], y[:, :t])
        assert not torch.allclose(y2[:, t], y[:, t])


def test_causal_conv_tail_continues_the_sequence():
    torch.manual_seed(0)
    conv = CausalDepthwiseConv(3, 4).double()
    x = torch.randn(1, 9, 3)
    whole, _ = conv(x)
    parts, tail = [], None
    for a, b in ((0, 1), (1, 3), (3, 9)):  # pieces shorter than the kernel too
        y, tail = conv(x[:, a:b], tail)
        parts.append(y)
    torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=1e-13, atol=1e-13)


def test_q_and_k_are_unit_norm_per_head_and_v_is_not(make_config):
    layer = _layer(make_config)
    x = 3.0 * torch.randn(2, 13, 32)
    q, k, v, tails = layer.qkv(x)
    assert q.shape == k.shape == v.shape == (2, 2, 13, 16)
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(2, 2, 13))
    torch.testing.assert_close(k.norm(dim=-1), torch.ones(2, 2, 13))
    assert not torch.allclose(v.norm(dim=-1), torch.ones(2, 2, 13))
    assert set(tails) == {"q", "k", "v"} and all(t.shape == (2, 3, 32) for t in tails.values())
    # order: projection -> conv -> SiLU -> l2 norm
    pre, _ = layer.q_conv(layer.q_proj(x))
    ref = F.normalize(F.silu(pre).unflatten(-1, (2, 16)).transpose(1, 2), dim=-1)
    torch.testing.assert_close(q, ref)


def test_gates_are_in_range_and_follow_the_bias_init(make_config):
    layer = _layer(make_config, theta_max=0.3, theta_bias=-2.0, eta_bias=1.0, alpha_bias=-6.0)
    x = 50.0 * torch.randn(3, 17, 32)  # saturating inputs
    theta, eta, alpha = layer.gates(x)
    assert theta.shape == eta.shape == alpha.shape == (3, 2, 17)
    assert theta.dtype == torch.float64
    assert (theta >= 0).all() and (theta <= 0.3).all() and theta.max() > 0.2
    assert (eta >= 0).all() and (eta <= 1).all()
    assert (alpha >= 0).all() and (alpha <= 1).all()
    theta0, eta0, alpha0 = layer.gates(torch.zeros(1, 1, 32))  # x = 0: the bias alone
    torch.testing.assert_close(theta0, torch.full_like(theta0, 0.3 * torch.sigmoid(torch.tensor(-2.0)).item()))
    torch.testing.assert_close(eta0, torch.full_like(eta0, 0.9 * torch.sigmoid(torch.tensor(1.0)).item()))
    torch.testing.assert_close(alpha0, torch.full_like(alpha0, torch.sigmoid(torch.tensor(-6.0)).item()))


def test_per_chunk_gates_take_the_first_token_of_each_chunk(make_config):
    per_token = _layer(make_config, chunk_size=4)
    per_chunk = _layer(make_config, chunk_size=4, per_chunk_gates=True)
    per_chunk.load_state_dict(per_token.state_dict())
    x = torch.randn(2, 10, 32)
    for g_tok, g_chunk in zip(per_token.gates(x), per_chunk.gates(x)):
        for t in range(10):
            torch.testing.assert_close(g_chunk[..., t], g_tok[..., t // 4 * 4], rtol=0, atol=0)
        assert not torch.allclose(g_chunk, g_tok)
    # still causal: a change at t (not a chunk start) leaves every output before t unchanged
    y, _ = per_chunk(x)
    x2 = x.clone()
    x2[:, 6] += 1.0
    y2, _ = per_chunk(x2)
    torch.testing.assert_close(y2[:, :6], y[:, :6], rtol=0, atol=0)
    assert not torch.allclose(y2[:, 6], y[:, 6])


def test_layer_is_its_parts_on_the_recurrent_reference(make_config):
    """forward == M_0 per sequence -> memory_recurrent -> per-head RMSNorm -> * sigmoid(x W_g) -> W_o."""
    layer = _layer(make_config, chunk_size=3)
    x = torch.randn(2, 10, 32)
    out, state = layer(x)
    q, k, v, _ = layer.qkv(x)
    theta, eta, alpha = layer.gates(x)
    y, ref_state = memory_recurrent(q, k, v, theta, eta, alpha, init_state(list(layer.initial_weights), 2),
                                    chunk_size=3, activation="gelu", surprise_clip=layer.surprise_clip)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6) * layer.out_norm.weight
    ref = layer.out_proj(y.transpose(1, 2).flatten(2) * torch.sigmoid(layer.gate_proj(x)))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(state.memory.weights + state.memory.momentum, ref_state.weights + ref_state.momentum):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_state_continues_exactly_and_sequences_are_independent(make_config):
    layer = _layer(make_config, chunk_size=4)
    x = torch.randn(2, 16, 32)
    whole, _ = layer(x)
    state, parts = None, []
    for a, b in ((0, 4), (4, 12), (12, 16)):  # chunk-aligned pieces
        y, state = layer(x[:, a:b], state)
        parts.append(y)
    torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=1e-12, atol=1e-13)
    x2 = x.clone()
    x2[1] = torch.randn(16, 32)  # another sequence in row 1: row 0 must not notice (own memory)
    y2, _ = layer(x2)
    torch.testing.assert_close(y2[0], whole[0], rtol=0, atol=0)


def test_initial_memory_and_gates_get_gradients(make_config):
    layer = _layer(make_config)
    out, _ = layer(torch.randn(2, 9, 32))
    out.square().sum().backward()
    for name in ("initial_weights.0", "initial_weights.1", "theta_proj.weight", "eta_proj.bias",
                 "alpha_proj.weight", "q_conv.weight", "out_norm.weight"):
        grad = dict(layer.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_read_context_reads_without_writing(make_config):
    layer = _layer(make_config)
    x = torch.randn(2, 5, 32)
    state = layer.initial_state(2)
    h, new_state = layer.read_context(x, state)
    assert new_state.memory is state.memory and set(new_state.conv_tails) == {"read_q"}
    # the read uses the q path of x and M_0
    q, _, _, _ = layer.qkv(x)
    r = memory_read(q, state.memory.weights)
    r = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + 1e-6) * layer.out_norm.weight
    ref = layer.out_proj(r.transpose(1, 2).flatten(2) * torch.sigmoid(layer.gate_proj(x)))
    torch.testing.assert_close(h, ref, rtol=1e-12, atol=1e-13)
