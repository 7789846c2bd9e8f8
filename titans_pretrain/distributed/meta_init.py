"""Start a model without materialising it: build on the meta device, shard, then initialise shard by
shard with exactly the weights an eager start would have drawn.

An eager start (``TitansLM(config)`` after seeding) draws from the CPU generator twice: in each
submodule's constructor (``nn.Linear`` and friends initialise themselves), then in
``TitansLM.reset_parameters``, which overwrites everything. A model built under
``torch.device("meta")`` draws nothing, so every rank can build the full model as metadata, apply
tensor, pipeline and data parallelism to it, and allocate only its shards (``to_empty``).

:func:`materialize` then fills the shards. It builds a reference model on the meta device under
:class:`_Replay`, a torch-function mode that repeats every in-place op aimed at a meta tensor on a
real CPU tensor of the same shape and dtype: the constructors' draws advance the generator exactly as
in an eager start, and the reference's ``reset_parameters`` then yields, one tensor at a time, the
full values an eager start ends with. Each is copied into the rank's parameter of the same name (its
local shard for a DTensor; nothing where another pipeline stage holds it) and dropped. No rank holds
more than its shards plus one full parameter (the largest: the embedding table), and the weights are
bit-identical to an eager start with the same seed, on any layout (tests/distributed/test_meta_init.py).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.overrides import TorchFunctionMode

__all__ = ["is_meta", "materialize", "replay_start"]

# In-place ops that overwrite the whole tensor: an init may start with one of these. Any other
# in-place op (mul_, clamp_, ...) must continue the op before it on the same tensor.
_OVERWRITES = {"uniform_", "normal_", "fill_", "zero_", "random_", "exponential_", "geometric_", "log_normal_",
               "cauchy_", "bernoulli_"}


def is_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


class _Replay(TorchFunctionMode):
    """Runs every in-place op on a meta tensor (``nn.init.*``, ``uniform_``, ``fill_``, ...) again on a
    CPU tensor of its shape, and hands the result to ``sink(meta_tensor, values)`` after each op."""

    def __init__(self, sink: Callable[[torch.Tensor, torch.Tensor], None] | None = None):
        super().__init__()
        self.sink = sink
        self.owner: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # nn.init functions dispatch with the tensor as a keyword; Tensor methods take it first
        target = args[0] if args else kwargs.get("tensor")
        name = getattr(func, "__name__", "")
        if not (isinstance(target, torch.Tensor) and target.is_meta and name.endswith("_")
                and not name.startswith("__")):
            return func(*args, **kwargs)
        if self.owner is not target:  # one full tensor alive at a time
            if name not in _OVERWRITES and getattr(func, "__module__", "") != "torch.nn.init":
                raise RuntimeError(f"meta init cannot replay {name} as the first op on a tensor (it reads "
                                   "the tensor's previous values): initialise it with a full overwrite first")
            self.owner = target
            self.values = torch.empty(target.shape, dtype=target.dtype, device="cpu")
        with torch.no_grad():
            if args:
                func(self.values, *args[1:], **kwargs)
            else:
                func(**{**kwargs, "tensor": self.values})
        if self.sink is not None:
            self.sink(target, self.values)
        return target


def _copy_into(param: torch.Tensor, values: torch.Tensor) -> None:
    """The part of the full ``values`` that ``param`` holds (a DTensor's local shard, or all of it)."""
    with torch.no_grad():
        if isinstance(param, DTensor):
            shard = distribute_tensor(values, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(shard.to_local())
        else:
            param.copy_(values)


def materialize(module: nn.Module, build: Callable[[], nn.Module], init: Callable[[nn.Module], None],
                device: torch.device) -> None:
    """Allocate ``module``'s parameters on ``device`` (``to_empty``: its shards only) and fill them
    with what an eager start holds, ``m = build(); init(m)``, by name. The generator must be where it
    was when the eager start would have begun (seed, build the meta model, shard, then call this)."""
    module.to_empty(device=device)
    replay_start(module, build, init, _copy_into)


def replay_start(module: nn.Module, build: Callable[[], nn.Module], init: Callable[[nn.Module], None],
                 copy: Callable[[torch.Tensor, torch.Tensor], None]) -> None:
    """Replay an eager start (``m = build(); init(m)``) on the meta device and hand each of its final
    full tensors to ``copy(param, values)`` for ``module``'s parameter of the same name."""
    mine: dict[str, torch.Tensor] = dict(module.named_parameters(remove_duplicate=False))
    with torch.device("meta"), _Replay():
        reference = build()  # the constructors' draws, as in an eager start
    targets: dict[int, list[torch.Tensor]] = {}
    for name, meta in reference.named_parameters(remove_duplicate=False):
        if name in mine:
            targets.setdefault(id(meta), []).append(mine[name])

    def sink(meta: torch.Tensor, values: torch.Tensor) -> None:
        for param in targets.get(id(meta), ()):
            copy(param, values)

    with torch.device("meta"), _Replay(sink):
        init(reference)
