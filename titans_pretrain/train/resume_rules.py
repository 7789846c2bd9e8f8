"""What a resumed run may change against its checkpoint's config, and what it may not.

One rule: keys the saved state cannot follow are refused before anything is written. Those are the
parameter shapes (found by building both models on the meta device, so every shape key counts
without a list to keep up to date), and the keys that define the model or the data stream without
showing in shapes. Every other key takes effect and is reported.
"""
from __future__ import annotations

import torch

from titans_pretrain.config import RunConfig

# Refused on resume even when no parameter shape changes: the variant decides what the saved
# tensors mean; the tokenizer, sequence length and seed decide which tokens come next. (The engine
# is checked against the checkpoint's own record; batch sizes and the dataset by the loader's state,
# which names the difference.)
FIXED_ON_RESUME = frozenset({"model.variant", "model.vocab_size", "data.seq_len", "data.tokenizer",
                             "train.seed"})


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(saved: RunConfig, now: RunConfig) -> list[tuple[str, object, object]]:
    """(dotted key, value in the checkpoint, value now) for every key that differs."""
    old, new = _flatten(saved.to_dict()), _flatten(now.to_dict())
    return [(key, old.get(key), new.get(key)) for key in sorted(old.keys() | new.keys())
            if old.get(key) != new.get(key)]


def parameter_differences(saved_model, model) -> list[str]:
    """How the parameters of a model built from `model` differ from the checkpoint's, in words."""
    from titans_pretrain.models import TitansLM

    def shapes(cfg) -> dict:
        with torch.device("meta"):
            return {k: tuple(v.shape) for k, v in TitansLM(cfg, init=False).state_dict().items()}

    old, new = shapes(saved_model), shapes(model)
    diffs = sorted(f"{k} {list(old[k])} -> {list(new[k])}" for k in old.keys() & new.keys() if old[k] != new[k])
    diffs += [f"{k} only in the checkpoint" for k in sorted(old.keys() - new.keys())]
    diffs += [f"{k} only in this model" for k in sorted(new.keys() - old.keys())]
    return diffs
