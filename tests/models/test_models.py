"""TitansConfig validation, TitansLM basics, causality of every variant, and MAC against a slow,
obvious reference (segment loop, explicit mask, per-query attention, token-by-token memory)."""
import math

import pytest
import torch
import torch.nn.functional as F

from titans_pretrain.models import TitansConfig, TitansLM
from titans_pretrain.models.attention import apply_rope, rope_cos_sin
from titans_pretrain.models.memory_ops import init_state, memory_read, memory_recurrent

pytestmark = pytest.mark.usefixtures("single_thread")

VARIANTS = ("mac", "mag", "mal", "lmm")


# ------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("overrides, field", [
    (dict(variant="gpt"), "variant"),
    (dict(memory_activation="relu"), "memory_activation"),
    (dict(d_model=30, n_heads=4), "n_heads"),
    (dict(head_dim=7), "head_dim"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(window=0), "window"),
    (dict(segment_len=-1), "segment_len"),
    (dict(n_persistent=-1), "n_persistent"),
    (dict(theta_max=0.0), "theta_max"),
    (dict(surprise_clip=-1.0), "surprise_clip"),
    (dict(surprise_clip=float("inf")), "surprise_clip"),
    (dict(variant="lmm", use_memory=False), "use_memory"),
])
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"TitansConfig\.{field}"):
        TitansConfig(**overrides)


def test_config_defaults_resolve():
    c = TitansConfig()
    assert c.resolved_head_dim == 64 and c.resolved_mlp_hidden == 704 and c.resolved_mlp_hidden % 64 == 0
    assert c.unit == c.segment_len and TitansConfig(variant="mag").unit == c.chunk_size


# ------------------------------------------------------------------------------------ basics
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_shapes_loss_and_backward(make_model, variant):
    model = make_model(variant, dtype=torch.float32)
    ids = torch.randint(0, 53, (2, 19))
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    labels[0, :5] = -100
    out = model(ids, labels=labels)
    assert out.logits.shape == (2, 19, 53) and out.state is None
    keep = labels != -100
    ref = F.cross_entropy(out.logits[keep].double(), labels[keep].long())
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-6, atol=1e-6)
    assert abs(out.loss.item() - math.log(53)) < 0.5  # near-uniform at init
    out.loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == [], f"parameters without gradient: {no_grad}"
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels=labels[:, :-1])


def test_model_attributes_tying_and_param_count(make_model):
    model = make_model("mag", dtype=torch.float32)
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) == 2
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    assert model.num_params(exclude_embeddings=True) == model.num_params() - 53 * 32
    tied = make_model("mag", dtype=torch.float32, tie_embeddings=True)
    assert tied.lm_head.weight is tied.embed.weight
    assert tied.num_params() == model.num_params() - 53 * 32
    assert tied.num_params(exclude_embeddings=True) == tied.num_params() - 53 * 32


@pytest.mark.parametrize("variant", VARIANTS)
def test_meta_device_build_then_reset_parameters_is_a_complete_init(make_config, variant):
    config = make_config(variant)
    torch.manual_seed(0)
    eager = TitansLM(config)
    with torch.device("meta"):
        model = TitansLM(config)
    model.to_empty(device="cpu")
    with torch.no_grad():  # poison the uninitialised storage: reset must overwrite every parameter
        for p in model.parameters():
            p.fill_(float("nan"))
    torch.manual_seed(0)
    model.reset_parameters()
    for (name, p), (_, q) in zip(model.named_parameters(), eager.named_parameters()):
        assert torch.isfinite(p).all(), name
        if name.endswith(("norm.weight", "_proj.bias")):
            assert torch.equal(p, q), name  # deterministic inits: ones, the configured gate biases
        else:
            assert abs(p.std().item() - q.std().item()) < 0.5 * q.std().item() + 1e-6, name
    assert torch.isfinite(model(torch.randint(0, 53, (1, 9))).logits).all()


# -------------------------------------------------------------------------------- causality
@pytest.mark.parametrize("variant, overrides", [(v, {}) for v in VARIANTS] + [
    ("mac", dict(use_memory=False)), ("mag", dict(use_memory=False)), ("mal", dict(per_chunk_gates=True)),
])
def test_changing_token_t_changes_no_earlier_logit(make_model, variant, overrides):
    """T = 37 spans 10 chunks (4) and 5 MAC segments (8); t = 13 and 22 sit inside a chunk and a segment."""
    model = make_model(variant, **overrides)
    torch.manual_seed(1)
    ids = torch.randint(0, 53, (2, 37))
    base = model(ids).logits
    for t in (0, 13, 22, 36):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 7) % 53
        logits = model(changed).logits
        torch.testing.assert_close(logits[:, :t], base[:, :t], rtol=0, atol=1e-12)
        assert (logits[:, t] - base[:, t]).abs().max() > 1e-6
        if t >= 30:
            continue
        later = (logits[:, t + 6:] - base[:, t + 6:]).abs().max()
        if variant == "mac" and not model.config.use_memory:
            # segment-local attention alone: nothing crosses into the next segment
            nxt = (t // 8 + 1) * 8
            torch.testing.assert_close(logits[:, nxt:], base[:, nxt:], rtol=0, atol=1e-12)
        else:  # the change does reach later tokens (through the memory or the window)
            assert later > 1e-8


# ---------------------------------------------------------------------- MAC vs slow reference
def _naive_conv(seq: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Causal depthwise conv of ``seq`` (B, T, C) token by token, zeros before the start."""
    K = weight.shape[-1]
    out = torch.zeros_like(seq)
    for t in range(seq.shape[1]):
        for j in range(K):  # tap j multiplies input t - (K - 1 - j)
            src = t - (K - 1 - j)
            if src >= 0:
                out[:, t] += seq[:, src] * weight[:, 0, j]
    return out


def _reference_mac_block(block, x):
    c = block.config
    mem, attn = block.memory, block.attn
    B, T, _ = x.shape
    C, H, D = c.segment_len, c.n_heads, c.resolved_head_dim
    heads = lambda t: t.unflatten(-1, (H, D)).transpose(1, 2)  # noqa: E731

    def out_head(r, inp):  # per-head RMSNorm, gate sigmoid(inp W_g), output projection
        r = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + c.norm_eps) * mem.out_norm.weight
        return mem.out_proj(r.transpose(1, 2).flatten(2) * torch.sigmoid(mem.gate_proj(inp)))

    h = block.norm(x)
    q_read_all = F.normalize(heads(F.silu(_naive_conv(mem.q_proj(h), mem.q_conv.weight))), dim=-1)
    state = init_state(list(mem.initial_weights), B)
    ys, outs = [], []
    for s0 in range(0, T, C):
        n = min(C, T - s0)
        seg = h[:, s0:s0 + n]
        # (1) read the memory as it stood at the end of the previous segment
        ctx = out_head(memory_read(q_read_all[:, :, s0:s0 + n], state.weights), seg)
        # (2) attention over [persistent | ctx | seg] with an explicit mask, one query at a time
        pers = attn.persistent
        kv_in = torch.cat((pers.expand(B, -1, -1), ctx, seg), dim=1)
        n_p = pers.shape[0]
        pos = torch.cat((torch.zeros(n_p), torch.arange(n), C + torch.arange(n))).long()
        keys, vals = heads(attn.k_proj(kv_in)), heads(attn.v_proj(kv_in))
        cos, sin = rope_cos_sin(pos, D, c.rope_theta, x.dtype)
        keys = torch.cat((keys[:, :, :n_p], apply_rope(keys, cos, sin)[:, :, n_p:]), dim=2)
        qcos, qsin = rope_cos_sin(C + torch.arange(n), D, c.rope_theta, x.dtype)
        queries = apply_rope(heads(attn.q_proj(seg)), qcos, qsin)
        y = torch.zeros(B, H, n, D, dtype=x.dtype)
        for i in range(n):
            visible = [j for j in range(n_p)] + [n_p + j for j in range(i + 1)] + [n_p + n + j for j in range(i + 1)]
            scores = torch.einsum("bhd,bhjd->bhj", queries[:, :, i], keys[:, :, visible]) / math.sqrt(D)
            y[:, :, i] = torch.einsum("bhj,bhjd->bhd", scores.softmax(-1), vals[:, :, visible])
        y_attn = attn.o_proj(y.transpose(1, 2).flatten(2))
        # (3) the (normalised) attention output writes the memory; (4) o = y gated by the read
        # after each token's own update (or u * read, the "product" option)
        y = y_attn * torch.rsqrt(y_attn.pow(2).mean(-1, keepdim=True) + c.norm_eps) * block.memory_in_norm.weight
        ys.append(y)
        y_all = torch.cat(ys, dim=1)  # the conv streams over y run across segments
        q = F.normalize(heads(F.silu(_naive_conv(mem.q_proj(y_all), mem.q_conv.weight)))[:, :, -n:], dim=-1)
        k = F.normalize(heads(F.silu(_naive_conv(mem.k_proj(y_all), mem.k_conv.weight)))[:, :, -n:], dim=-1)
        v = heads(F.silu(_naive_conv(mem.v_proj(y_all), mem.v_conv.weight)))[:, :, -n:]
        theta = (c.theta_max * torch.sigmoid(mem.theta_proj(y))).transpose(1, 2)
        eta = (c.eta_max * torch.sigmoid(mem.eta_proj(y))).transpose(1, 2)
        alpha = torch.sigmoid(mem.alpha_proj(y)).transpose(1, 2)
        r, state = memory_recurrent(q, k, v, theta, eta, alpha, state, chunk_size=c.chunk_size,
                                    activation=c.memory_activation, surprise_clip=c.surprise_clip)
        r = out_head(r, y)
        if c.mac_output_gate == "sigmoid":
            gate = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + c.norm_eps) * block.memory_out_norm.weight
            outs.append(y_attn * torch.sigmoid(gate))
        else:
            outs.append(y * r)
    x = x + torch.cat(outs, dim=1)
    return x + block.mlp(block.mlp_norm(x))


@pytest.mark.parametrize("overrides", [dict(), dict(segment_len=6, chunk_size=4, memory_depth=1,
                                                    memory_activation="silu", n_persistent=1,
                                                    mac_output_gate="product")])
def test_mac_matches_slow_reference(make_model, overrides):
    model = make_model("mac", **overrides)
    with torch.no_grad():  # make every part matter: a non-trivial output-norm scale
        for block in model.blocks:
            block.memory.out_norm.weight.uniform_(0.5, 1.5)
            block.memory_in_norm.weight.uniform_(0.5, 1.5)
            if model.config.mac_output_gate == "sigmoid":
                block.memory_out_norm.weight.uniform_(0.5, 1.5)
    torch.manual_seed(3)
    ids = torch.randint(0, 53, (2, 21))  # 2 full segments + a partial one
    x = model.embed(ids)
    for block in model.blocks:
        x = _reference_mac_block(block, x)
    ref = model.lm_head(model.norm(x))
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-10, atol=1e-10)
