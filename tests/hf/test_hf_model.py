"""The exported model equals the native one: weights, logits (parallel and streamed), greedy
generation, loss; its cache is bounded and exact; misuse fails with a message naming the fix."""
from __future__ import annotations

import json
from dataclasses import fields

import pytest
import torch

from titans_pretrain.hf.export import export_model
from titans_pretrain.models import TitansConfig, TitansLM

SMALL = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, chunk_size=4, segment_len=8, window=6,
             n_persistent=2, memory_expansion=2)
VARIANTS = {
    "mac": dict(variant="mac"),
    "mag": dict(variant="mag"),
    "mal": dict(variant="mal"),
    "lmm": dict(variant="lmm"),
    # the other switches in one model: tied embeddings, linear memory, silu, per-chunk gates, no persistent
    "mag_tied_linear": dict(variant="mag", tie_embeddings=True, memory_depth=1, memory_activation="silu",
                            per_chunk_gates=True, n_persistent=0),
    "mal_no_memory": dict(variant="mal", use_memory=False),
}


def native(name: str, seed: int = 0) -> TitansLM:
    torch.manual_seed(seed)
    model = TitansLM(TitansConfig(**{**SMALL, **VARIANTS[name]})).eval()
    with torch.no_grad():  # move every parameter off its init value (norm scales of one, zero biases...)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def load(folder, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **kwargs).eval()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_matches_native(name, tmp_path):
    model = native(name)
    # a tiny shard size on one variant: the sharded layout (index + shards) must load too
    shard = "20KB" if name == "mac" else "5GB"
    out = export_model(model, tmp_path / name, max_shard_size=shard, prefill_chunk=1)
    assert (out / "model.safetensors.index.json").is_file() == (name == "mac")
    hf = load(out)
    assert type(hf).__module__.startswith("transformers_modules"), "must run the exported remote code"

    hf_state = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    for key, tensor in model.state_dict().items():
        assert torch.equal(hf_state[key], tensor), key

    ids = torch.randint(0, SMALL["vocab_size"], (2, 29), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
        parallel = hf(ids).logits
        streamed = hf(ids, use_cache=True)  # prefill_chunk=1 -> pieces of one streaming unit
    torch.testing.assert_close(parallel, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(streamed.logits, expected, rtol=0, atol=1e-5)
    assert streamed.cache.get_seq_length() == 29

    hf.generation_config.eos_token_id = None  # native greedy decoding does not stop at EOS
    generated = hf.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(generated[:, :29], ids)
    assert torch.equal(generated[:, 29:], model.generate(ids, 12))


def test_config_json_holds_every_hyperparameter(tmp_path):
    model = native("mag_tied_linear")
    out = export_model(model, tmp_path / "m")
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == "titans"
    assert raw["auto_map"]["AutoModelForCausalLM"] == "modeling_titans.TitansForCausalLM"
    assert raw["auto_map"]["AutoConfig"] == "configuration_titans.TitansHFConfig"
    for f in fields(TitansConfig):
        assert raw[f.name] == getattr(model.config, f.name), f.name
    assert raw["tie_word_embeddings"] is True
    assert raw["max_position_embeddings"] is None  # no run config: the trained context is unknown
    trained = json.loads((export_model(model, tmp_path / "r", run_config={"data": {"seq_len": 48}})
                          / "config.json").read_text())
    assert trained["max_position_embeddings"] == 48
    source = (out / "modeling_titans.py").read_text()
    assert "import titans_pretrain" not in source and "from titans_pretrain" not in source


def test_bf16_export(tmp_path):
    from safetensors import safe_open

    model = native("mag")
    out = export_model(model, tmp_path / "bf16", dtype="bfloat16")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert next(model.parameters()).dtype == torch.float32, "export must not cast the caller's model"
    hf = load(out)
    assert hf.dtype == torch.bfloat16
    ids = torch.randint(0, 64, (1, 16))
    with torch.no_grad():
        got, want = hf(ids).logits.float(), model(ids).logits
    assert (got - want).abs().max() < 0.1 * want.abs().max()


def test_long_prompt_cache_is_bounded_and_exact(tmp_path):
    model = native("mal")
    hf = load(export_model(model, tmp_path / "m", prefill_chunk=8))

    def state_bytes(cache):
        total = []

        def visit(obj):
            if isinstance(obj, torch.Tensor):
                total.append(obj.numel() * obj.element_size())
            elif hasattr(obj, "__dataclass_fields__"):
                for name in obj.__dataclass_fields__:
                    visit(getattr(obj, name))
            elif isinstance(obj, (list, tuple)):
                for x in obj:
                    visit(x)
            elif isinstance(obj, dict):
                for x in obj.values():
                    visit(x)
        visit(cache.state)
        return sum(total)

    g = torch.Generator().manual_seed(2)
    short, long = torch.randint(0, 64, (1, 40), generator=g), torch.randint(0, 64, (1, 200), generator=g)
    with torch.no_grad():
        out_short = hf(short, use_cache=True, logits_to_keep=1)
        out_long = hf(long, use_cache=True, logits_to_keep=1)
        full = model(long).logits
    assert out_long.logits.shape == (1, 1, 64)
    torch.testing.assert_close(out_long.logits[:, -1], full[:, -1], rtol=0, atol=1e-5)
    assert state_bytes(out_long.cache) == state_bytes(out_short.cache)  # both end on a unit boundary


def test_cache_continues_and_reorders(tmp_path):
    model = native("mac")
    hf = load(export_model(model, tmp_path / "m"))
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 64, (2, 21), generator=g)
    with torch.no_grad():
        first = hf(ids[:, :13], use_cache=True)
        cache = first.cache
        first.cache.reorder_cache(torch.tensor([1, 0]))
        rest = hf(ids.flip(0)[:, 13:], cache=cache)
        expected = model(ids.flip(0)).logits
    assert rest.cache is cache and cache.get_seq_length() == 21
    torch.testing.assert_close(rest.logits, expected[:, 13:], rtol=0, atol=1e-5)


def test_loss_uses_unshifted_labels(tmp_path):
    model = native("lmm")
    hf = load(export_model(model, tmp_path / "m"))
    ids = torch.randint(0, 64, (2, 17))
    labels = ids.clone()
    labels[0, 5] = -100
    native_labels = torch.cat((labels[:, 1:], torch.full((2, 1), -100)), dim=1)  # pre-shifted convention
    with torch.no_grad():
        torch.testing.assert_close(hf(ids, labels=labels).loss, model(ids, labels=native_labels).loss,
                                   rtol=0, atol=1e-6)


def test_misuse_is_refused(tmp_path):
    hf = load(export_model(native("mag"), tmp_path / "m"))
    ids = torch.randint(0, 64, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="must be"):
        hf(ids, attention_mask=mask[:, 1:])
    cache = hf(ids, use_cache=True).cache  # consumed every column as a real token
    with pytest.raises(ValueError, match="pass the mask with the first call"):
        hf(ids[:, :1], cache=cache, attention_mask=torch.cat((mask, mask[:, :1]), dim=1))
    with pytest.raises(ValueError, match="input_ids, not inputs_embeds"):
        hf(inputs_embeds=torch.zeros(2, 8, 32))
    with pytest.raises(TypeError, match="TitansCache"):
        hf(ids, cache=object())
    with pytest.raises(ValueError, match="dtype"):
        export_model(native("mag"), tmp_path / "x", dtype="int8")


def test_beam_search_and_sampling_through_the_cache(tmp_path):
    hf = load(export_model(native("mag"), tmp_path / "m"))
    hf.generation_config.eos_token_id = None
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(4))
    cached = hf.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False)
    recomputed = hf.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, recomputed)  # reorder_cache keeps every beam's state with its tokens
    torch.manual_seed(0)
    sampled = hf.generate(ids, max_new_tokens=5, do_sample=True, top_k=5, num_return_sequences=2)
    assert sampled.shape == (4, 14) and torch.equal(sampled[::2, :9], ids)


@pytest.mark.parametrize("variant", ["mac", "mag", "mal", "lmm"])
def test_padded_batch_generates_as_one_at_a_time(variant, tmp_path):
    """Left-padded prompts through transformers' generate (cached and recomputed) and a right-padded
    forward: every real position equals its sequence alone (fp64), as does every greedy token."""
    model = native(variant).double()
    hf = load(export_model(model, tmp_path / variant, prefill_chunk=1)).double()
    hf.generation_config.eos_token_id = None
    g = torch.Generator().manual_seed(6)
    rows = [torch.randint(0, 64, (n,), generator=g) for n in (3, 10, 17)]  # chunk 4, segment 8: all offsets
    T = 17
    left, right = torch.zeros(3, T, dtype=torch.long), torch.zeros(3, T, dtype=torch.long)
    lmask, rmask = torch.zeros_like(left), torch.zeros_like(right)
    for b, r in enumerate(rows):
        left[b, T - len(r):], lmask[b, T - len(r):] = r, 1
        right[b, :len(r)], rmask[b, :len(r)] = r, 1
    with torch.no_grad():
        cached = hf.generate(left, attention_mask=lmask, max_new_tokens=10, do_sample=False)
        recomputed = hf.generate(left, attention_mask=lmask, max_new_tokens=10, do_sample=False, use_cache=False)
        logits = hf(right, attention_mask=rmask).logits
        streamed = hf(right, attention_mask=rmask, use_cache=True).logits
        for b, r in enumerate(rows):
            alone = hf.generate(r[None], max_new_tokens=10, do_sample=False)[0, len(r):]
            assert torch.equal(alone, model.generate(r[None], 10)[0])
            assert torch.equal(cached[b, T:], alone) and torch.equal(recomputed[b, T:], alone), b
            want = model(r[None]).logits[0]
            torch.testing.assert_close(logits[b, :len(r)], want, rtol=0, atol=1e-12)
            torch.testing.assert_close(streamed[b, :len(r)], want, rtol=0, atol=1e-12)


def test_batched_cache_continues_into_a_padded_batch(tmp_path):
    """A cache built without padding splits into per-row states when padding arrives, exactly."""
    model = native("mac").double()
    hf = load(export_model(model, tmp_path / "m")).double()
    g = torch.Generator().manual_seed(8)
    prefix, more = torch.randint(0, 64, (2, 11), generator=g), torch.randint(0, 64, (2, 6), generator=g)
    mask = torch.ones(2, 17, dtype=torch.long)
    mask[1, 11:13] = 0  # row 1: two pads after the prefix
    with torch.no_grad():
        cache = hf(prefix, use_cache=True).cache
        out = hf(more, cache=cache, attention_mask=mask)
        assert cache.get_seq_length() == 17 and cache.rows is not None
        for b in range(2):
            real = torch.cat((prefix[b], more[b][mask[b, 11:].bool()]))
            want = model(real[None]).logits[0, 11:]
            torch.testing.assert_close(out.logits[b][mask[b, 11:].bool()], want, rtol=0, atol=1e-12)


def test_beam_search_on_a_padded_batch(tmp_path):
    """Beam search reorders the per-row states: a left-padded batch's beams equal each prompt's alone."""
    model = native("mag").double()
    hf = load(export_model(model, tmp_path / "m")).double()
    hf.generation_config.eos_token_id = None
    g = torch.Generator().manual_seed(9)
    rows = [torch.randint(0, 64, (n,), generator=g) for n in (4, 9)]
    ids, mask = torch.zeros(2, 9, dtype=torch.long), torch.zeros(2, 9, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, 9 - len(r):], mask[b, 9 - len(r):] = r, 1
    with torch.no_grad():
        beams = hf.generate(ids, attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False)
        for b, r in enumerate(rows):
            alone = hf.generate(r[None], max_new_tokens=5, num_beams=3, do_sample=False)
            assert torch.equal(beams[b, 9:], alone[0, len(r):]), b
