"""Test-only compatibility layer: run megatron-core's parallel code on CPU with gloo.

megatron-core assumes CUDA in a few private places that our CPU tests reach. This module patches
exactly those, in the calling process only, and only while the tests run (never imported by the
library; on a GPU machine Megatron needs none of it):

1. ``torch.cuda.current_device`` -> ``"cpu"``: Megatron allocates buffers and moves RoPE tables to
   ``torch.cuda.current_device()``.
2. ``CudaRNGStatesTracker.fork`` -> a no-op context: the model-parallel RNG tracker swaps CUDA RNG
   states around dropout and initialisation (our tests use no dropout and CPU initialisation).
3. ``get_default_causal_mask`` / ``get_sliding_window_causal_mask`` build their masks with a
   hard-coded ``device="cuda"``: rebuilt on CPU (same values).
4. ``torch.cuda.synchronize`` -> no-op: ``dist_checkpointing`` synchronises around its writes.
5. Megatron's optimizer modules, pipeline schedules and ``megatron.core.utils``' gradient norm
   create small tensors with a hard-coded ``device="cuda"`` (loss scale, norms, token counts,
   overflow buffers): their module-level ``torch`` is a proxy whose tensor factories send
   ``"cuda"`` to the CPU.
6. Tensor type names: the optimizers accept only ``param.type() == "torch.cuda.FloatTensor"`` (and
   Half/BFloat16): ``Tensor.type()`` without arguments reports CPU tensors under their CUDA names.
"""
from __future__ import annotations

import contextlib
import importlib
from functools import lru_cache

import torch

PATCHED_VERSION = "0.16.1"

# (module, attribute) pairs this layer replaces; all must exist in the pinned version.
TARGETS = [
    ("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker"),
    ("megatron.core.transformer.utils", "get_default_causal_mask"),
    ("megatron.core.transformer.utils", "get_sliding_window_causal_mask"),
    ("megatron.core.fusions.fused_softmax", "get_default_causal_mask"),
    ("megatron.core.fusions.fused_softmax", "get_sliding_window_causal_mask"),
]


# Modules whose module-level ``torch`` is replaced by the CPU proxy (patch 5).
DEVICE_MODULES = [
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.utils",  # local_multi_tensor_l2_norm (the grad norm without Apex)
    "megatron.core.pipeline_parallel.schedules",
]


class MegatronCompatError(RuntimeError):
    pass


def check_megatron_version() -> None:
    """Raise :class:`MegatronCompatError` unless megatron-core is the patched version with every target."""
    try:
        import megatron.core
    except ImportError as e:
        raise MegatronCompatError("megatron-core is not installed: pip install -e '.[dev]' (or '.[megatron]'); "
                                  "the Megatron tests must run in CI") from e
    if megatron.core.__version__ != PATCHED_VERSION:
        raise MegatronCompatError(
            f"megatron-core {megatron.core.__version__} is installed but tests/integrations/megatron_cpu_compat.py "
            f"patches {PATCHED_VERSION}: re-check every patch against the new version, then move PATCHED_VERSION "
            "and the pin of the [megatron] extra in pyproject.toml together")
    for module in DEVICE_MODULES:
        if not hasattr(importlib.import_module(module), "torch"):
            raise MegatronCompatError(f"{module} no longer imports torch at module level: patch 5 no longer matches")
    for module, attr in TARGETS:
        if not hasattr(importlib.import_module(module), attr):
            raise MegatronCompatError(f"{module}.{attr} is gone in megatron-core {megatron.core.__version__}: "
                                      "the CPU compatibility patches no longer match")
    tracker = importlib.import_module(TARGETS[0][0]).CudaRNGStatesTracker
    if not callable(getattr(tracker, "fork", None)):
        raise MegatronCompatError("CudaRNGStatesTracker.fork is gone: the CPU compatibility patches no longer match")


@lru_cache(maxsize=None)
def _causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq), diagonal=1).bool()


def _sliding_window_mask(sq: int, skv: int, window_size) -> torch.Tensor:
    m = torch.ones(sq, skv, dtype=torch.bool)
    return ~torch.tril(torch.triu(m, diagonal=skv - sq - window_size[0]), diagonal=skv - sq + window_size[1])


@contextlib.contextmanager
def _noop_fork(self, name=None):
    yield


class _CpuTorch:
    """``torch`` as seen by Megatron's optimizer modules: tensor factories map ``device="cuda"`` to CPU."""

    _FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "zeros_like", "ones_like", "empty_like")

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name not in self._FACTORIES:
            return attr

        def factory(*args, **kwargs):
            if str(kwargs.get("device", "")).startswith("cuda"):
                kwargs["device"] = "cpu"
            return attr(*args, **kwargs)

        return factory


_CPU_TORCH = _CpuTorch()
_TENSOR_TYPE = torch.Tensor.type


def _cuda_type_name(self, dtype=None, non_blocking=False, **kwargs):
    """``Tensor.type()``: a CPU tensor's name as CUDA would give it (patch 6); conversions unchanged."""
    if dtype is None and not kwargs:
        name = _TENSOR_TYPE(self)
        return name.replace("torch.", "torch.cuda.", 1) if self.device.type == "cpu" else name
    return _TENSOR_TYPE(self, dtype, non_blocking, **kwargs)


def apply_cpu_compat() -> contextlib.ExitStack:
    """Check the version, apply the patches; returns an ExitStack whose ``close()`` undoes them."""
    check_megatron_version()
    from unittest import mock

    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(torch.cuda, "current_device", lambda: "cpu"))
    stack.enter_context(mock.patch.object(torch.cuda, "synchronize", lambda *a, **k: None))
    tracker = importlib.import_module("megatron.core.tensor_parallel.random").CudaRNGStatesTracker
    stack.enter_context(mock.patch.object(tracker, "fork", _noop_fork))
    for module in ("megatron.core.transformer.utils", "megatron.core.fusions.fused_softmax"):
        mod = importlib.import_module(module)
        stack.enter_context(mock.patch.object(mod, "get_default_causal_mask", _causal_mask))
        stack.enter_context(mock.patch.object(mod, "get_sliding_window_causal_mask", _sliding_window_mask))
    for module in DEVICE_MODULES:
        stack.enter_context(mock.patch.object(importlib.import_module(module), "torch", _CPU_TORCH))
    stack.enter_context(mock.patch.object(torch.Tensor, "type", _cuda_type_name))
    return stack
