"""``TitansHFConfig``: the Hugging Face config of a Titans model (``model_type = "titans"``).

This file is copied as is into every exported folder (``configuration_titans.py``), so it imports
nothing but transformers. It stores every ``TitansConfig`` hyper-parameter as a flat attribute of
the same name; the modeling file rebuilds ``TitansConfig`` from them (its own defaults fill any key
an older export lacks), so no list of fields is kept here to drift out of date.
"""
from __future__ import annotations

from transformers import PretrainedConfig


class TitansHFConfig(PretrainedConfig):
    """Flat Titans hyper-parameters plus the usual HF aliases (``hidden_size`` = ``d_model``, ...).

    ``prefill_chunk`` bounds memory when a cache is used (``generate``): the prompt is fed through the
    streaming state in pieces of about this many tokens (rounded to the model's streaming unit), so
    activations and logits never cover the whole prompt at once.

    ``max_position_embeddings`` is the context the model was trained on (the run's ``data.seq_len``;
    ``None`` when unknown): where extrapolation starts. Nothing in the model is sized by it; clients
    that read it (lm-evaluation-harness) cut their inputs to it, and generation streams past it."""

    model_type = "titans"
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers",
                     "num_attention_heads": "n_heads"}

    def __init__(self, vocab_size: int = 8192, d_model: int = 256, n_layers: int = 4, n_heads: int = 4,
                 tie_embeddings: bool = False, prefill_chunk: int = 2048,
                 max_position_embeddings: int | None = None, **kwargs):
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.tie_embeddings = tie_embeddings
        self.prefill_chunk = prefill_chunk
        self.max_position_embeddings = max_position_embeddings
        kwargs.pop("tie_word_embeddings", None)  # derived from tie_embeddings, never set on its own
        super().__init__(tie_word_embeddings=tie_embeddings, **kwargs)
