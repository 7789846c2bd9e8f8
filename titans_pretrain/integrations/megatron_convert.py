"""Move Titans weights between our native ``TitansLM`` and its Megatron-core twin (both ways).

The Megatron side is the full (tensor-parallel size 1) state dict of
``titans_pretrain.integrations.megatron.titans_gpt_model(titans)``: load it into a TP=1 model
and save with ``dist_checkpointing`` to get a checkpoint that loads at any TP size, or take a
Megatron checkpoint of any TP size, load it into a TP=1 model, and convert its ``state_dict()``.
:func:`save_megatron_checkpoint` / :func:`load_megatron_checkpoint` do the file side in one process.

Key mapping (layer ``i``; ``L = decoder.layers.i``):

================================  ======================================================
native (``TitansLM``)              Megatron (``GPTModel``)
================================  ======================================================
``embed.weight``                   ``embedding.word_embeddings.weight``
``blocks.i.memory.*`` (LMM)        ``L.self_attention.*`` (same names below it)
``blocks.i.memory_norm`` (LMM)     ``L.input_layernorm``
``blocks.i.norm`` (MAG, MAC)       ``L.input_layernorm``
``blocks.i.<rest>`` (MAL/MAG/MAC)  ``L.self_attention.<rest>`` (memory, norms)
``blocks.i.attn.{q,k,v}_proj``     ``L.self_attention.attention.linear_qkv`` (per head ``[q; k; v]``)
``blocks.i.attn.o_proj``           ``L.self_attention.attention.linear_proj``
``blocks.i.mlp_norm``              ``L.pre_mlp_layernorm``
``blocks.i.mlp.{gate,up}_proj``    ``L.mlp.linear_fc1`` (``[gate; up]``)
``blocks.i.mlp.down_proj``         ``L.mlp.linear_fc2``
``norm.weight``                    ``decoder.final_layernorm.weight``
``lm_head.weight``                 ``output_layer.weight`` (absent when tied)
================================  ======================================================

What Megatron cannot express, so the converter refuses it: persistent memory tokens
(``n_persistent > 0``) and the attention-only ablation (``use_memory=False``).
"""
from __future__ import annotations


import torch
from torch import Tensor

from titans_pretrain.models.titans import TitansConfig

__all__ = ["check_convertible", "megatron_to_native", "native_to_megatron"]



def check_convertible(titans: TitansConfig) -> None:
    """Raise ``ValueError`` naming the setting when ``titans`` has no Megatron twin."""
    if titans.variant != "lmm" and titans.n_persistent:
        raise ValueError(f"TitansConfig.n_persistent={titans.n_persistent}: Megatron's attention has no "
                         "persistent memory tokens; only models with n_persistent=0 convert")
    if not titans.use_memory:
        raise ValueError("TitansConfig.use_memory=False (attention-only ablation) has no Titans Megatron twin")


def _qkv_fuse(q: Tensor, k: Tensor, v: Tensor, n_heads: int) -> Tensor:
    """Megatron's fused qkv layout for multi-head attention: per head, ``[q_h; k_h; v_h]`` rows."""
    d = q.shape[1]
    return torch.stack([t.reshape(n_heads, -1, d) for t in (q, k, v)], dim=1).reshape(-1, d)


def _qkv_split(w: Tensor, n_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    d = w.shape[1]
    q, k, v = w.reshape(n_heads, 3, -1, d).unbind(1)
    return q.reshape(-1, d), k.reshape(-1, d), v.reshape(-1, d)


def _block_map(titans: TitansConfig) -> list[tuple[str, str]]:
    """(native suffix prefix, Megatron suffix prefix) pairs for everything but attention and the MLP."""
    v = titans.variant
    if v == "lmm":
        return [("memory_norm.", "input_layernorm."), ("memory.", "self_attention.")]
    if v == "mal":
        return [("memory_norm.", "self_attention.memory_norm."), ("memory.", "self_attention.memory."),
                ("attn_norm.", "self_attention.attn_norm.")]
    if v == "mag":
        return [("norm.", "input_layernorm."), ("memory.", "self_attention.memory."),
                ("attn_out_norm.", "self_attention.attn_out_norm."),
                ("memory_out_norm.", "self_attention.memory_out_norm.")]
    return [("norm.", "input_layernorm."), ("memory.", "self_attention.memory."),
            ("memory_in_norm.", "self_attention.memory_in_norm.")]


def native_to_megatron(native: dict[str, Tensor], titans: TitansConfig) -> dict[str, Tensor]:
    """A native ``TitansLM`` state dict -> the state dict of a TP=1 ``titans_gpt_model(titans)``
    (``_extra_state`` entries left out: load with ``strict=False`` and check the missing keys are
    only those, or use :func:`load_into_megatron`)."""
    check_convertible(titans)
    native = dict(native)
    out: dict[str, Tensor] = {"embedding.word_embeddings.weight": native.pop("embed.weight"),
                              "decoder.final_layernorm.weight": native.pop("norm.weight")}
    lm_head = native.pop("lm_head.weight")
    if not titans.tie_embeddings:
        out["output_layer.weight"] = lm_head
    pairs = _block_map(titans)
    for i in range(titans.n_layers):
        n, m = f"blocks.{i}.", f"decoder.layers.{i}."
        out[m + "pre_mlp_layernorm.weight"] = native.pop(n + "mlp_norm.weight")
        out[m + "mlp.linear_fc1.weight"] = torch.cat((native.pop(n + "mlp.gate_proj.weight"),
                                                      native.pop(n + "mlp.up_proj.weight")), dim=0)
        out[m + "mlp.linear_fc2.weight"] = native.pop(n + "mlp.down_proj.weight")
        if titans.variant != "lmm":
            a = n + "attn."
            out[m + "self_attention.attention.linear_qkv.weight"] = _qkv_fuse(
                native.pop(a + "q_proj.weight"), native.pop(a + "k_proj.weight"), native.pop(a + "v_proj.weight"),
                titans.n_heads)
            out[m + "self_attention.attention.linear_proj.weight"] = native.pop(a + "o_proj.weight")
        for key in [k for k in native if k.startswith(n)]:
            rest = key[len(n):]
            for src, dst in pairs:
                if rest.startswith(src):
                    out[m + dst + rest[len(src):]] = native.pop(key)
                    break
    if native:
        raise ValueError(f"native weights with no Megatron counterpart: {sorted(native)[:8]}")
    return out


def megatron_to_native(megatron: dict[str, Tensor], titans: TitansConfig) -> dict[str, Tensor]:
    """The state dict of a TP=1 ``titans_gpt_model(titans)`` -> a native ``TitansLM`` state dict."""
    check_convertible(titans)
    src = {k: v for k, v in megatron.items() if not k.endswith("_extra_state")}
    out: dict[str, Tensor] = {"embed.weight": src.pop("embedding.word_embeddings.weight"),
                              "norm.weight": src.pop("decoder.final_layernorm.weight")}
    out["lm_head.weight"] = out["embed.weight"] if titans.tie_embeddings else src.pop("output_layer.weight")
    pairs = _block_map(titans)
    for i in range(titans.n_layers):
        n, m = f"blocks.{i}.", f"decoder.layers.{i}."
        out[n + "mlp_norm.weight"] = src.pop(m + "pre_mlp_layernorm.weight")
        out[n + "mlp.gate_proj.weight"], out[n + "mlp.up_proj.weight"] = \
            src.pop(m + "mlp.linear_fc1.weight").chunk(2, dim=0)
        out[n + "mlp.down_proj.weight"] = src.pop(m + "mlp.linear_fc2.weight")
        if titans.variant != "lmm":
            q, k, v = _qkv_split(src.pop(m + "self_attention.attention.linear_qkv.weight"), titans.n_heads)
            out[n + "attn.q_proj.weight"], out[n + "attn.k_proj.weight"], out[n + "attn.v_proj.weight"] = q, k, v
            out[n + "attn.o_proj.weight"] = src.pop(m + "self_attention.attention.linear_proj.weight")
        # Longest Megatron prefix first ("self_attention.memory." before "self_attention.").
        for key in [k for k in src if k.startswith(m)]:
            rest = key[len(m):]
            for nat, meg in sorted(pairs, key=lambda p: -len(p[1])):
                if rest.startswith(meg):
                    out[n + nat + rest[len(meg):]] = src.pop(key)
                    break
    if src:
        raise ValueError(f"Megatron weights with no native counterpart: {sorted(src)[:8]} (is this a Titans "
                         f"GPTModel of variant {titans.variant!r} with {titans.n_layers} layers?)")
    return {k: v.contiguous() for k, v in out.items()}


def load_into_megatron(model, native: dict[str, Tensor], titans: TitansConfig) -> None:
    """Load a native state dict into a TP=1 Megatron model; every missing key must be an ``_extra_state``."""
    missing, unexpected = model.load_state_dict(native_to_megatron(native, titans), strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"the Megatron model does not match TitansConfig (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
