"""Titans memory layers for Megatron-core models (extra ``[megatron]``, tested with megatron-core 0.16.1).

Megatron users keep their stack (``TransformerLayer``, ``GPTModel``, ``dist_checkpointing``, their
trainer) and swap the token mixer of a layer for a Titans one through a ``ModuleSpec``:

* :class:`TitansMemoryMixer` is our :class:`~titans_pretrain.models.memory.MemoryLayer` with the
  linear layers replaced by Megatron's parallel ones (``ColumnParallelLinear`` for the q/k/v, gate
  and output-gate projections, ``RowParallelLinear`` for the output projection) and holding only
  this rank's heads. Everything between the projections (causal conv, SiLU, l2-norm, per-head
  gates, ``M_0``, the memory core, per-head output norm) is MemoryLayer's own code, and it is local to
  a head, so tensor parallelism over heads costs one all-reduce forward and one backward per layer.
* :class:`TitansMALMixer`, :class:`TitansMAGMixer` and :class:`TitansMACMixer` combine that memory
  with Megatron's own ``SelfAttention`` (sliding window for MAL/MAG, the MAC segment mask for MAC),
  as our native blocks do (``titans_pretrain.models.blocks``).
* :func:`titans_layer_spec` places a mixer in a Megatron ``TransformerLayer`` (RMSNorm, SwiGLU MLP
  as ``linear_fc1 = [gate; up]``); :func:`titans_transformer_config` and :func:`titans_gpt_model`
  build a Megatron ``GPTModel`` with the same numbers as a native :class:`TitansLM`
  (``titans_pretrain.integrations.megatron_convert`` moves weights between the two).

Every mixer takes and returns Megatron's ``[seq, batch, hidden]`` layout and returns
``(output, None)`` (no separate bias) to the layer's bias-dropout-add. Its ``sharded_state_dict``
marks each tensor's tensor-parallel axis, so ``dist_checkpointing`` saves at one TP size and
loads at another.

Not supported (clear errors): ``sequence_parallel``, packed sequences, Megatron inference
contexts (use the native model's streaming state for generation), context parallelism, and
persistent memory tokens (Megatron's attention has none: build the native model with
``n_persistent=0``).
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    import megatron.core as _mcore
except ImportError as e:  # pragma: no cover - the extra is installed in CI
    raise ImportError("titans_pretrain.integrations.megatron needs megatron-core: "
                      "pip install 'titans-pretrain[megatron]'") from e

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, copy_to_tensor_model_parallel_region
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

from titans_pretrain.models.blocks import mac_output
from titans_pretrain.models.memory import CausalDepthwiseConv, MemoryLayer
from titans_pretrain.models.norms import RMSNorm
from titans_pretrain.models.titans import TitansConfig

__all__ = [
    "TESTED_MEGATRON_CORE",
    "TitansMACMixer",
    "TitansMAGMixer",
    "TitansMALMixer",
    "TitansMemoryMixer",
    "titans_block_spec",
    "titans_gpt_model",
    "titans_layer_spec",
    "titans_transformer_config",
]

TESTED_MEGATRON_CORE = "0.16.1"
MEGATRON_CORE_VERSION = _mcore.__version__


# ------------------------------------------------------------------------------------ config
def titans_transformer_config(titans: TitansConfig, **overrides) -> TransformerConfig:
    """The Megatron ``TransformerConfig`` whose layers compute what ``titans``' native blocks do.

    Shapes, norm (RMSNorm, ``norm_eps``), SwiGLU MLP without biases, no dropout, init std, and for
    MAL/MAG the sliding window (Megatron's ``window_size=(window - 1, 0)``: the query and the
    ``window - 1`` tokens before it). Kernel fusions that exist only on GPU are off; pass
    ``overrides`` (e.g. ``tensor_model_parallel_size=2``, ``params_dtype``, ``bf16``) for the rest."""
    kwargs = dict(
        num_layers=titans.n_layers, hidden_size=titans.d_model, num_attention_heads=titans.n_heads,
        kv_channels=titans.resolved_head_dim, ffn_hidden_size=titans.resolved_mlp_hidden,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, normalization="RMSNorm",
        layernorm_epsilon=titans.norm_eps, hidden_dropout=0.0, attention_dropout=0.0,
        init_method_std=titans.init_std, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        window_size=(titans.window - 1, 0) if titans.variant in ("mal", "mag") else None,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def _check_shapes(config: TransformerConfig, titans: TitansConfig, tp: int) -> None:
    pairs = [("hidden_size", config.hidden_size, "d_model", titans.d_model),
             ("num_attention_heads", config.num_attention_heads, "n_heads", titans.n_heads),
             ("kv_channels", config.kv_channels, "head_dim", titans.resolved_head_dim)]
    for mname, mval, tname, tval in pairs:
        if mval != tval:
            raise ValueError(f"TransformerConfig.{mname}={mval} differs from TitansConfig.{tname}={tval}: "
                             "build the Megatron config with titans_transformer_config(titans)")
    if titans.n_heads % tp:
        raise ValueError(f"n_heads={titans.n_heads} is not divisible by the tensor-parallel size {tp}: "
                         "the memory is sharded by whole heads")
    if config.sequence_parallel:
        raise ValueError("sequence_parallel is not supported by the Titans mixers yet: set sequence_parallel=False")
    if config.context_parallel_size > 1:
        raise ValueError("Megatron context parallelism is not supported by the Titans mixers (the memory "
                         "is recurrent over the sequence): set context_parallel_size=1")


def _tp_group(pg_collection: ProcessGroupCollection | None):
    if pg_collection is None:
        pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
    return pg_collection, pg_collection.tp


def _no_unsupported(packed_seq_params=None, inference_context=None, inference_params=None, **_unused) -> None:
    if packed_seq_params is not None:
        raise NotImplementedError("packed sequences are not supported by the Titans mixers (the memory would "
                                  "carry across documents): pass packed_seq_params=None")
    if inference_context is not None or inference_params is not None:
        raise NotImplementedError("Megatron inference contexts are not supported by the Titans mixers: convert "
                                  "to the native model (megatron_convert) and use its streaming state")


# ------------------------------------------------------------------------------ the memory mixer
class _Column(ColumnParallelLinear):
    """``ColumnParallelLinear`` returning only its local output (bias added), as ``nn.Linear`` does,
    so :class:`MemoryLayer`'s code runs on it unchanged."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x)[0]


class _Row(RowParallelLinear):
    """``RowParallelLinear`` (input split over heads, output all-reduced) returning only its output."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x)[0]


class TitansMemoryMixer(MemoryLayer, MegatronModule):
    """The Titans memory as a Megatron token mixer, sharded over the tensor-parallel group by heads.

    It *is* a :class:`MemoryLayer` (same attribute names, same methods, so the same math and the
    same state-dict keys) whose projections are Megatron parallel linears and whose ``n_heads`` is
    the local head count. ``M_0``, the conv weights and the per-head norm hold the local heads'
    slices; they are initialised from the full tensors (drawn identically on every rank) so a
    seeded model starts from the same weights at every TP size. Call it Megatron-style:
    ``hidden_states [s, b, h] -> (out [s, b, h], None)``."""

    def __init__(self, config: TransformerConfig, titans: TitansConfig, layer_number: int = 1,
                 pg_collection: ProcessGroupCollection | None = None, **_unused):
        MegatronModule.__init__(self, config)  # nn.Module init; MemoryLayer.__init__ builds nn.Linear: skipped
        self.pg_collection, self.tp_group = _tp_group(pg_collection)
        self.tp_size, self.tp_rank = self.tp_group.size(), self.tp_group.rank()
        _check_shapes(config, titans, self.tp_size)
        c = titans
        self.total_heads = c.n_heads
        self.n_heads, self.head_dim = c.n_heads // self.tp_size, c.resolved_head_dim  # local heads
        self.chunk_size, self.activation, self.surprise_clip = c.chunk_size, c.memory_activation, c.surprise_clip
        self.state_interval = c.memory_state_interval
        self.theta_max, self.eta_max, self.per_chunk_gates = c.theta_max, c.eta_max, c.per_chunk_gates
        H, D, d = c.n_heads, self.head_dim, c.d_model
        inner, local_inner = H * D, self.n_heads * D
        # The seven column projections read the same input: instead of an all-reduce of the input
        # gradient per projection, one for all (_tp_input), so the layer's backward costs one.
        col = partial(_Column, config=config, init_method=config.init_method, gather_output=False,
                      tp_group=self.tp_group, disable_grad_reduce=True)
        self.q_proj = col(d, inner, bias=False)
        self.k_proj = col(d, inner, bias=False)
        self.v_proj = col(d, inner, bias=False)
        with torch.random.fork_rng(devices=[]):  # the convs' own local-size init must not move the RNG:
            self.q_conv = CausalDepthwiseConv(local_inner, c.conv_kernel)  # reset_memory_parameters
            self.k_conv = CausalDepthwiseConv(local_inner, c.conv_kernel)  # draws the full-size ones
            self.v_conv = CausalDepthwiseConv(local_inner, c.conv_kernel)
        self.theta_proj = col(d, H, bias=True)
        self.eta_proj = col(d, H, bias=True)
        self.alpha_proj = col(d, H, bias=True)
        self.gate_biases = {"theta_proj": c.theta_bias, "eta_proj": c.eta_bias, "alpha_proj": c.alpha_bias}
        E = c.memory_expansion * D
        dims = [D] + [E] * (c.memory_depth - 1) + [D]
        self.initial_weights = nn.ParameterList(
            nn.Parameter(torch.empty(self.n_heads, dims[i], dims[i + 1], dtype=config.params_dtype))
            for i in range(c.memory_depth))
        self.out_norm = RMSNorm((self.n_heads, 1, D), eps=c.norm_eps)
        self.gate_proj = col(d, inner, bias=False)
        self.out_proj = _Row(inner, d, config=config, init_method=config.output_layer_init_method, bias=False,
                             input_is_parallel=True, skip_bias_add=False, tp_group=self.tp_group)
        for conv in (self.q_conv, self.k_conv, self.v_conv):
            conv.weight.data = conv.weight.data.to(config.params_dtype)
        self.out_norm.weight.data = self.out_norm.weight.data.to(config.params_dtype)
        # Megatron's grad-norm, clipping and optimizers count a parameter on every TP rank only when it
        # is marked tensor-parallel (else once, as a replica): mark the head-sharded ones.
        for p in [*self.initial_weights, self.out_norm.weight, self.q_conv.weight, self.k_conv.weight,
                  self.v_conv.weight]:
            set_tensor_model_parallel_attributes(p, is_parallel=True, dim=0, stride=1)
        self.reset_memory_parameters()

    def _local(self, full: Tensor) -> Tensor:
        """This rank's heads (or head channels) of a tensor over all heads, along dim 0."""
        n = full.shape[0] // self.tp_size
        return full[self.tp_rank * n:(self.tp_rank + 1) * n]

    def reset_memory_parameters(self) -> None:
        """Gate biases from the config; ``M_0`` and the conv weights as MemoryLayer draws them, over
        all heads (same draws on every rank), then sliced to the local heads."""
        for name, bias in self.gate_biases.items():
            nn.init.constant_(getattr(self, name).bias, bias)
        with torch.no_grad():
            for w in self.initial_weights:
                full = torch.empty(self.total_heads, *w.shape[1:], dtype=w.dtype)
                nn.init.normal_(full, std=1.0 / math.sqrt(w.shape[1]))
                w.copy_(self._local(full))
            for conv in (self.q_conv, self.k_conv, self.v_conv):
                full = torch.empty(conv.weight.shape[0] * self.tp_size, *conv.weight.shape[1:], dtype=conv.weight.dtype)
                bound = 1.0 / math.sqrt(conv.kernel)
                nn.init.uniform_(full, -bound, bound)
                conv.weight.copy_(self._local(full))

    def _tp_input(self, x: Tensor) -> Tensor:
        """Identity forward; backward all-reduces the input gradient over TP (the heads' shares)."""
        return copy_to_tensor_model_parallel_region(x, group=self.tp_group) if self.tp_size > 1 else x

    def write_read(self, x: Tensor, state=None):
        """:meth:`MemoryLayer.forward` on ``x`` ``[b, s, h]`` (this rank's heads): ``(out, state)``."""
        return MemoryLayer.forward(self, self._tp_input(x), state)

    def read_context(self, x: Tensor, state=None):  # type: ignore[override]
        """:meth:`MemoryLayer.read_context` (MAC's read without update) on this rank's heads."""
        return MemoryLayer.read_context(self, self._tp_input(x), state)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs):  # type: ignore[override]
        """``[s, b, h]`` -> ``([s, b, h], None)``: write every token into the memory and read it back
        (MemoryLayer.forward on this rank's heads; ``out_proj`` sums the heads over TP)."""
        _no_unsupported(**kwargs)
        out, _ = self.write_read(hidden_states.transpose(0, 1).contiguous())
        return out.transpose(0, 1).contiguous(), None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Every tensor is split by heads: dim 0 (out features, gate heads, conv channels, ``M_0``
        and norm heads), except ``out_proj.weight`` (dim 1, its input features)."""
        state = self.state_dict(prefix="", keep_vars=True)
        axes = {k: (1 if k == "out_proj.weight" else 0) for k in state if not k.endswith("_extra_state")}
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        return make_sharded_tensors_for_checkpoint(state, prefix, axes, sharded_offsets, tp_group=self.tp_group,
                                                   dp_cp_group=metadata["dp_cp_group"])


# ----------------------------------------------------------------- memory + Megatron attention
def _self_attention_spec() -> ModuleSpec:
    """Megatron's local (non-Transformer-Engine) causal self-attention: fused qkv, core attention, proj."""
    return ModuleSpec(module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                      submodules=SelfAttentionSubmodules(linear_qkv=ColumnParallelLinear,
                                                         core_attention=DotProductAttention,
                                                         linear_proj=RowParallelLinear,
                                                         q_layernorm=IdentityOp, k_layernorm=IdentityOp))


class _Hybrid(MegatronModule):
    """Shared construction of the memory + attention mixers."""

    def __init__(self, config: TransformerConfig, titans: TitansConfig, layer_number: int = 1,
                 pg_collection: ProcessGroupCollection | None = None, **_unused):
        super().__init__(config)
        if titans.n_persistent:
            raise ValueError(f"TitansConfig.n_persistent={titans.n_persistent}: Megatron's attention has no "
                             "persistent memory tokens; use n_persistent=0")
        if not titans.use_memory:
            raise ValueError("TitansConfig.use_memory=False (attention-only ablation): use Megatron's own "
                             "GPT layer spec for that")
        self.pg_collection, self.tp_group = _tp_group(pg_collection)
        self.titans = titans
        self.memory = TitansMemoryMixer(config, titans, layer_number, self.pg_collection)
        self.attention = build_module(_self_attention_spec(), config=config, layer_number=layer_number,
                                      pg_collection=self.pg_collection)

    def _norm(self) -> RMSNorm:
        return RMSNorm(self.titans.d_model, eps=self.titans.norm_eps)


def _check_window(config: TransformerConfig, titans: TitansConfig, name: str) -> None:
    want = (titans.window - 1, 0)
    if config.window_size is None or tuple(config.window_size) != want:
        raise ValueError(f"{name} attention is a sliding window of TitansConfig.window={titans.window} tokens: "
                         f"set TransformerConfig.window_size={want} (got {config.window_size}); "
                         "titans_transformer_config(titans) does")


def _rope(rotary_pos_emb, name: str):
    if rotary_pos_emb is None:
        raise ValueError(f"{name} attention needs RoPE: build the GPTModel with position_embedding_type='rope' "
                         "(titans_gpt_model does)")
    return rotary_pos_emb


class TitansMALMixer(_Hybrid):
    """Memory as a layer (MAL): ``x + m + attn(attn_norm(x + m))`` with ``m = memory(memory_norm(x))``.

    It does its own pre-norms and inner residual, so its ``TransformerLayer`` has no input norm and
    the layer's residual add supplies the outer ``x``. Attention: Megatron's, sliding window."""

    def __init__(self, config, titans, layer_number=1, pg_collection=None, **_unused):
        super().__init__(config, titans, layer_number, pg_collection)
        _check_window(config, titans, "MAL")
        self.memory_norm, self.attn_norm = self._norm(), self._norm()

    def forward(self, hidden_states, attention_mask=None, rotary_pos_emb=None, **kwargs):
        _no_unsupported(**kwargs)
        m, _ = self.memory(self.memory_norm(hidden_states))
        y, _ = self.attention(self.attn_norm(hidden_states + m), attention_mask,
                              rotary_pos_emb=_rope(rotary_pos_emb, "MAL"))
        return m + y, None


class TitansMAGMixer(_Hybrid):
    """Memory as a gate (MAG): ``attn_out_norm(y) * sigmoid(memory_out_norm(m))`` with sliding-window
    attention ``y`` and the memory ``m`` on the same (layer-normed) input."""

    def __init__(self, config, titans, layer_number=1, pg_collection=None, **_unused):
        super().__init__(config, titans, layer_number, pg_collection)
        _check_window(config, titans, "MAG")
        self.attn_out_norm, self.memory_out_norm = self._norm(), self._norm()

    def forward(self, hidden_states, attention_mask=None, rotary_pos_emb=None, **kwargs):
        _no_unsupported(**kwargs)
        y, _ = self.attention(hidden_states, attention_mask, rotary_pos_emb=_rope(rotary_pos_emb, "MAG"))
        m, _ = self.memory(hidden_states)
        return self.attn_out_norm(y) * torch.sigmoid(self.memory_out_norm(m)), None


class TitansMACMixer(_Hybrid):
    """Memory as context (MAC), segment by segment as :class:`~titans_pretrain.models.blocks.MACBlock`:
    read ``h = M(q(x_s))``, attend over ``[h | x_s]`` (query ``i`` sees ``h_j``, ``x_j`` for ``j <= i``;
    RoPE positions ``j`` for ``h_j`` and ``segment_len + j`` for ``x_j``), write ``u = norm(y)`` into the
    memory, output ``y * sigmoid(memory_out_norm(memory(u)))`` (``mac_output_gate="product"``:
    ``u * memory(u)``).

    Megatron's ``SelfAttention`` projects queries, keys and values from one sequence, so it runs on
    ``[h | x_s]`` with an explicit mask and the ``h`` rows of its output are dropped (twice the
    attention FLOPs of the native block, same numbers). It builds its own rotary table (the model's
    ``position_embedding_type`` should be ``"none"``)."""

    def __init__(self, config, titans, layer_number=1, pg_collection=None, **_unused):
        super().__init__(config, titans, layer_number, pg_collection)
        if config.window_size is not None:
            raise ValueError("MAC attention is segment-local, not sliding-window: set TransformerConfig.window_size=None")
        self.memory_in_norm = self._norm()
        if titans.mac_output_gate == "sigmoid":
            self.memory_out_norm = self._norm()
        self.rotary = RotaryEmbedding(kv_channels=titans.resolved_head_dim, rotary_percent=1.0,
                                      rotary_base=titans.rope_theta, use_cpu_initialization=True)

    def _mask(self, n: int, device) -> Tensor:
        """``[1, 1, 2n, 2n]``, True = masked (Megatron's convention). Rows of ``h`` queries are causal
        over ``h`` (never used); row ``n + i`` sees ``h_j`` and ``x_j`` for ``j <= i``."""
        causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        top = torch.cat((causal, torch.zeros_like(causal)), dim=1)
        bottom = torch.cat((causal, causal), dim=1)
        return ~torch.cat((top, bottom), dim=0)[None, None]

    def forward(self, hidden_states, attention_mask=None, rotary_pos_emb=None, **kwargs):
        _no_unsupported(**kwargs)
        C = self.titans.segment_len
        x = hidden_states.transpose(0, 1)  # [b, s, h]
        table = self.rotary(2 * C)  # [2C, 1, 1, D]
        state = self.memory.initial_state(x.shape[0])
        outs = []
        for start in range(0, x.shape[1], C):
            seg = x[:, start:start + C].contiguous()
            n = seg.shape[1]
            context, state = self.memory.read_context(seg, state)
            kv = torch.cat((context, seg), dim=1).transpose(0, 1).contiguous()  # [2n, b, h]
            pos = torch.cat((torch.arange(n), C + torch.arange(n))).to(table.device)
            y, _ = self.attention(kv, self._mask(n, kv.device), rotary_pos_emb=table[pos])
            y = y[n:].transpose(0, 1)
            u = self.memory_in_norm(y)
            r, state = self.memory.write_read(u, state)
            outs.append(mac_output(self.titans.mac_output_gate, y, u, r, getattr(self, "memory_out_norm", None)))
        return torch.cat(outs, dim=1).transpose(0, 1).contiguous(), None


_MIXERS = {"lmm": TitansMemoryMixer, "mal": TitansMALMixer, "mag": TitansMAGMixer, "mac": TitansMACMixer}


# --------------------------------------------------------------------------------- layer specs
def titans_layer_spec(titans: TitansConfig) -> ModuleSpec:
    """A ``TransformerLayer`` spec whose token mixer is the Titans ``titans.variant`` mixer.

    Layout per variant (native block in brackets): LMM ``x + mixer(norm(x))`` [LMMBlock.memory_norm];
    MAG, MAC: the layer's input norm is the block's ``norm``; MAL: no layer input norm (the mixer
    holds both of the block's norms). Then ``pre_mlp_layernorm`` and Megatron's SwiGLU MLP."""
    if titans.variant not in _MIXERS:
        raise ValueError(f"TitansConfig.variant={titans.variant!r}: must be one of {tuple(_MIXERS)}")
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=IdentityOp if titans.variant == "mal" else WrappedTorchNorm,
            self_attention=ModuleSpec(module=_MIXERS[titans.variant], params={"titans": titans}),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                                 linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def titans_block_spec(titans: TitansConfig, config: TransformerConfig | None = None,
                      vp_stage: int | None = None) -> TransformerBlockSubmodules:
    """This pipeline stage's Titans layers and an RMSNorm final norm (``WrappedTorchNorm`` whatever the
    backend). With ``config``, the layers are those of the current pipeline (and virtual) stage, as
    Megatron's own ``get_gpt_decoder_block_spec`` does; without it, all ``n_layers``."""
    layer = titans_layer_spec(titans)
    n = titans.n_layers
    if config is not None and config.pipeline_model_parallel_size > 1:
        n = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=WrappedTorchNorm)


def titans_gpt_model(titans: TitansConfig, config: TransformerConfig | None = None, *,
                     max_sequence_length: int = 1 << 20, **gpt_kwargs) -> GPTModel:
    """A Megatron ``GPTModel`` with Titans layers, the Megatron twin of ``TitansLM(titans)``.

    Untied embeddings unless ``titans.tie_embeddings``; RoPE (base ``rope_theta``) for MAL/MAG, no
    position embedding for LMM (the memory's conv and recurrence carry position) and MAC (its
    mixer rotates ``[h | x]`` itself). ``max_sequence_length`` only bounds Megatron's tables."""
    config = config or titans_transformer_config(titans)
    kwargs = dict(
        vocab_size=titans.vocab_size, max_sequence_length=max_sequence_length,
        share_embeddings_and_output_weights=titans.tie_embeddings,
        position_embedding_type="rope" if titans.variant in ("mal", "mag") else "none",
        rotary_base=titans.rope_theta,
    )
    kwargs.update(gpt_kwargs)
    return GPTModel(config, titans_block_spec(titans, config, kwargs.get("vp_stage")), **kwargs)
