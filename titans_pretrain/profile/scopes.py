"""Component scopes for the time breakdown, installed from outside the model.

The model code stays free of profiling: we wrap the methods through which each component runs
(`Attention.forward/segment/sliding`, `MemoryLayer.forward/read_context`, `SwiGLU.forward`) on the
*instances*, so each call opens a `torch.profiler.record_function("titans::<component>")` range.
Forward time is read from these ranges; backward time is attributed through autograd's sequence
numbers (see `breakdown.py`). Module hooks alone would miss MAC's `segment`/`read_context` calls.
"""
from __future__ import annotations

import functools

from torch import nn
from torch.profiler import record_function

SCOPE_PREFIX = "titans::"

# component -> (class name, methods that run it). Matched by class name so that the profile does
# not import model internals it does not need; a class that is absent simply contributes nothing.
COMPONENT_METHODS: dict[str, tuple[str, tuple[str, ...]]] = {
    "attention": ("Attention", ("forward", "segment", "sliding")),
    "memory": ("MemoryLayer", ("forward", "read_context")),
    "mlp": ("SwiGLU", ("forward",)),
}


def _scoped(method, name: str):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with record_function(name):
            return method(*args, **kwargs)

    return wrapper


def install_scopes(model: nn.Module) -> dict[str, int]:
    """Wrap the component methods of every matching submodule; return instances per component.

    Call before `parallelize` (the wrappers are instance attributes, so FSDP2, DDP and activation
    checkpointing keep them). Parameter names do not change."""
    counts = {c: 0 for c in COMPONENT_METHODS}
    for module in model.modules():
        for component, (cls_name, methods) in COMPONENT_METHODS.items():
            if type(module).__name__ != cls_name:
                continue
            counts[component] += 1
            for name in methods:
                if hasattr(module, name):
                    setattr(module, name, _scoped(getattr(module, name), SCOPE_PREFIX + component))
    return counts
