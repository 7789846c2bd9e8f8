"""The Hugging Face wrapper around ``TitansLM``: ``TitansForCausalLM`` and its cache ``TitansCache``.

This module is the tail of the exported ``modeling_titans.py``: at conversion time :mod:`.bundle`
pastes the model's own modules above it and rewrites the ``titans_pretrain`` imports, so the folder
runs with transformers and torch only, and no second copy of the model is maintained by hand.

Generation uses the model's exact streaming state as its cache: the memory weights and momentum,
the conv tails, a ``window - 1`` key/value cache per sliding-window layer and fewer than one
streaming unit of pending ids. Its size does not grow with the sequence, and prompts are fed in
pieces of ``config.prefill_chunk`` tokens, so a long prompt runs in bounded memory.

Conventions that differ from the native model (they follow transformers): ``labels`` are *unshifted*
(``labels = input_ids`` trains next-token prediction; the model shifts them), and ``forward`` returns
a cache only when one is passed in or ``use_cache=True``.

Padded batches (``attention_mask`` with zeros, any side) go through the native ``forward_padded``:
each row's real tokens run alone through its own state, so every real position gets the logits of
its sequence run alone (chunk and segment boundaries included); pad positions get zero logits. The
cache then holds one state per row, and such a batch runs one row at a time.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from titans_pretrain.hf.configuration_titans import TitansHFConfig
from titans_pretrain.models.generation import forward_padded
from titans_pretrain.models.titans import TitansConfig, TitansLM, TitansState

__all__ = ["TitansCache", "TitansCausalLMOutput", "TitansForCausalLM", "TitansHFConfig", "titans_config_from_hf"]


def titans_config_from_hf(config: TitansHFConfig) -> TitansConfig:
    """The native config from the flat HF attributes (``TitansConfig`` defaults fill missing keys)."""
    names = [f.name for f in dataclasses.fields(TitansConfig)]
    return TitansConfig(**{name: getattr(config, name) for name in names if hasattr(config, name)})


def _map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``fn`` to every tensor inside a state (dataclasses, named tuples, tuples, lists, dicts)."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _map_tensors(getattr(obj, f.name), fn)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_map_tensors(x, fn) for x in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(x, fn) for x in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


class TitansCache:
    """``generate()``'s cache: a :class:`TitansState` (bounded size, exact continuation).

    Not a ``transformers.Cache`` subclass on purpose: the state is not a per-layer key/value list,
    and duck typing keeps this file independent of that class's changing internals. It offers what
    generation reads: the number of tokens seen, ``is_linear`` (nothing to slice by position) and
    ``reorder_cache`` for beam search. A cache passed to ``forward`` is advanced in place.

    After a padded batch it holds ``rows`` (one state per row, each over that row's real tokens
    only) instead of ``state``, and counts the columns seen, pads included, as generation does."""

    is_compileable = False
    is_croppable = False

    def __init__(self, state: TitansState | None = None):
        self.state = state
        self.rows: list[TitansState | None] | None = None
        self.columns = 0  # columns seen, pads included (kept for ``rows``)

    @property
    def is_linear(self) -> list[bool]:
        return [True]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens (padded batch: columns) consumed so far (the next token's column)."""
        if self.rows is not None:
            return self.columns
        if self.state is None:
            return 0
        return int(self.state.position) + int(self.state.pending.shape[1])

    def split_rows(self, batch_size: int) -> None:
        """Switch to one state per row (a padded input follows); rows are independent, so this is exact."""
        if self.rows is not None:
            return
        seen = self.get_seq_length()
        if self.state is None:
            self.rows = [None] * batch_size
        else:
            self.rows = [_map_tensors(self.state, lambda t, b=b: t[b:b + 1]) for b in range(batch_size)]
        self.state, self.columns = None, seen

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Select/reorder the batch rows (beam search)."""
        if self.rows is not None:
            self.rows = [self.rows[i] for i in beam_idx.tolist()]  # states are never changed in place
        elif self.state is not None:
            self.state = _map_tensors(self.state, lambda t: t.index_select(0, beam_idx.to(t.device)))

    def __repr__(self) -> str:
        return f"TitansCache(seen={self.get_seq_length()}{', per row' if self.rows is not None else ''})"


@dataclass
class TitansCausalLMOutput(ModelOutput):
    """Logits, optional loss, and the cache (``None`` unless a cache was used)."""

    loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None
    cache: Optional[TitansCache] = None


class TitansPreTrainedModel(PreTrainedModel):
    config_class = TitansHFConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["MACBlock", "MAGBlock", "MALBlock", "LMMBlock"]

    def _init_weights(self, module: nn.Module) -> None:
        """``TitansLM`` initialises itself (``reset_parameters``); ``from_pretrained`` then loads
        every tensor, since the exported checkpoint holds them all."""


class TitansForCausalLM(TitansPreTrainedModel, GenerationMixin):
    """A Titans language model for transformers; ``self.model`` is the native ``TitansLM``."""

    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}

    def __init__(self, config: TitansHFConfig):
        super().__init__(config)
        self.model = TitansLM(titans_config_from_hf(config))
        self.post_init()

    # -------------------------------------------------------------------------- embeddings
    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.model.lm_head = value

    # -------------------------------------------------------------------------- generation glue
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """No ``DynamicCache``: the first forward creates a :class:`TitansCache` (as recurrent models do)."""
        return False

    def prepare_inputs_for_generation(self, input_ids: Tensor, cache: TitansCache | None = None,
                                      past_key_values: TitansCache | None = None,
                                      attention_mask: Tensor | None = None, inputs_embeds: Tensor | None = None,
                                      logits_to_keep: int | None = None, use_cache: bool = True, **kwargs):
        """Feed only the tokens the cache has not seen (all of them on the first step)."""
        cache = cache if cache is not None else past_key_values
        if inputs_embeds is not None:
            raise ValueError("TitansForCausalLM.generate takes input_ids, not inputs_embeds")
        if cache is not None and use_cache:
            input_ids = input_ids[:, cache.get_seq_length():]
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": use_cache}
        if cache is not None and use_cache:
            inputs["cache"] = cache
        if logits_to_keep is not None:
            inputs["logits_to_keep"] = logits_to_keep
        return inputs

    # -------------------------------------------------------------------------- forward
    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, cache: TitansCache | None = None,
                past_key_values: TitansCache | None = None, use_cache: bool | None = None,
                logits_to_keep: int = 0, return_dict: bool | None = None,
                inputs_embeds: Tensor | None = None, **kwargs) -> TitansCausalLMOutput | tuple:
        """Logits for ``input_ids`` ``(B, T)`` continuing ``cache`` (if any).

        ``logits_to_keep=k > 0`` returns only the last ``k`` positions' logits (generation asks for
        1). ``attention_mask`` ``(B, T)``, or ``(B, seen + T)`` with a cache as generation passes it,
        marks pads with 0: a padded batch runs each row's real tokens alone (module docstring), pad
        positions get zero logits. Extra HF kwargs (``position_ids``, ``output_attentions``, ...) are
        accepted and ignored: positions come from the cache (per row: from its real tokens)."""
        if inputs_embeds is not None:
            raise ValueError("TitansForCausalLM takes input_ids, not inputs_embeds")
        if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError("TitansForCausalLM.forward needs input_ids of shape (batch, seq) with seq >= 1 "
                             "(with a cache: the tokens it has not seen yet)")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, TitansCache):
            raise TypeError(f"cache must be a TitansCache (returned by this model), got {type(cache).__name__}")
        if use_cache is None:
            use_cache = cache is not None
        mask = self._new_tokens_mask(input_ids, attention_mask, cache if use_cache else None)
        if mask is not None or (use_cache and cache is not None and cache.rows is not None):
            logits, cache = self._forward_padded(input_ids, mask, cache if use_cache else None, logits_to_keep,
                                                 use_cache)
        elif use_cache:
            logits, cache = self._forward_streaming(input_ids, cache, logits_to_keep)
        else:
            logits = self.model(input_ids).logits
            if logits_to_keep:
                logits = logits[:, -logits_to_keep:]
            cache = None
        loss = None
        if labels is not None:
            if logits.shape[1] != input_ids.shape[1]:
                raise ValueError("labels need the logits of every position: pass logits_to_keep=0")
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        out = TitansCausalLMOutput(loss=loss, logits=logits, cache=cache)
        if return_dict is False:
            return out.to_tuple()
        return out

    def _forward_streaming(self, input_ids: Tensor, cache: TitansCache | None,
                           logits_to_keep: int) -> tuple[Tensor, TitansCache]:
        """Feed ``input_ids`` through the streaming state in pieces of ``prefill_chunk`` tokens
        (a multiple of the streaming unit), keeping only the requested logits: memory stays bounded
        by one piece whatever the prompt length."""
        unit = self.model.config.unit
        piece = max(unit, int(getattr(self.config, "prefill_chunk", 2048)) // unit * unit)
        state = None if cache is None else cache.state
        T = input_ids.shape[1]
        first_kept = 0 if not logits_to_keep else max(0, T - logits_to_keep)
        kept = []
        for start in range(0, T, piece):
            out = self.model(input_ids[:, start:start + piece], state=state, return_state=True)
            state = out.state
            end = start + out.logits.shape[1]
            if end > first_kept:
                kept.append(out.logits[:, max(0, first_kept - start):])
        if cache is None:
            cache = TitansCache(state)
        else:
            cache.state = state
        return torch.cat(kept, dim=1), cache

    @staticmethod
    def _new_tokens_mask(input_ids: Tensor, attention_mask: Tensor | None, cache: TitansCache | None) -> Tensor | None:
        """The mask of ``input_ids``' own columns when it has zeros (a padded batch), else None."""
        if attention_mask is None:
            return None
        B, T = input_ids.shape
        seen = 0 if cache is None else cache.get_seq_length()
        if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] not in (T, seen + T):
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must be (batch, seq) = ({B}, {T}), or "
                             f"({B}, {seen + T}) covering the {seen} columns in the cache as well")
        if cache is not None and cache.rows is None and attention_mask.shape[1] == seen + T \
                and not bool(attention_mask[:, :seen].all()):
            raise ValueError("attention_mask has zeros over columns this cache consumed as real tokens: pass the "
                             "mask with the first call as well (the cache then runs each row on its own)")
        mask = attention_mask[:, -T:]
        return None if bool(mask.all()) else mask

    def _forward_padded(self, input_ids: Tensor, mask: Tensor | None, cache: TitansCache | None,
                        logits_to_keep: int, use_cache: bool) -> tuple[Tensor, TitansCache | None]:
        """A padded batch: each row's real tokens alone, through its own state (``forward_padded``)."""
        B, T = input_ids.shape
        if mask is None:
            mask = torch.ones_like(input_ids)
        keep_from = 0 if not logits_to_keep else max(0, T - logits_to_keep)
        unit = self.model.config.unit
        piece = max(unit, int(getattr(self.config, "prefill_chunk", 2048)) // unit * unit)
        if not use_cache:
            logits, _ = forward_padded(self.model, input_ids, mask, None, keep_from=keep_from, piece_len=piece)
            return logits, None
        if cache is None:
            cache = TitansCache()
        cache.split_rows(B)
        logits, cache.rows = forward_padded(self.model, input_ids, mask, cache.rows, keep_from=keep_from,
                                            piece_len=piece)
        cache.columns += T
        return logits, cache
