"""Context parallelism: each rank of a ``cp`` group holds one contiguous slice of every sequence,
and every block's recurrent state is relayed from the rank holding the previous slice.

A block's state at a slice boundary is exactly its streaming state (:class:`BlockState`): the
memory (weights and momentum of every memory-MLP layer, per sequence and head), the causal convs'
last ``kernel - 1`` inputs (the conv halo) and, for MAG/MAL, the sliding window's last
``window - 1`` rotated keys/values (the attention halo). The streaming path is already exact when
a call starts on the block's unit grid (``chunk_size``, or ``segment_len`` for MAC), so rank ``r``
computes its slice of block ``l`` as ``block(x_r, state_from_r-1, return_state=True)`` and hands
the returned state to rank ``r+1``. The hand-off is differentiable: the gradient of rank ``r``'s
entry state travels back to rank ``r-1`` in backward.

Sends are non-blocking and receives block, so the schedule is a wavefront: while rank ``r`` runs
block ``l``, rank ``r-1`` already runs block ``l+1``. With ``cp_microbatches = m`` each block runs
its slice in ``m`` pieces along the batch, handing each piece's state on as soon as it is ready,
which shortens the fill of the wavefront: idle fraction ``(P-1) / (m L + P - 1)`` in forward and
again in backward (docs/context_parallel.md).

Parallelism is applied from outside: :func:`apply_context_parallel` replaces each block
instance's ``forward`` (parameter names, and so checkpoints, do not change), and only the
training call ``block(x)`` is relayed; streaming calls with a state go straight to the block.
Gradients of the parameters are partial sums per slice: :meth:`ContextParallel.sync_gradients`
sums them over the group after backward.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from titans_pretrain.models.attention import KVCache
from titans_pretrain.models.blocks import BlockState
from titans_pretrain.models.memory import MemoryLayerState
from titans_pretrain.models.memory_ops import MemoryState
from titans_pretrain.models.titans import lm_loss

__all__ = ["ContextParallel", "RelayStats", "apply_context_parallel", "blocks_of", "flatten_state",
           "unflatten_state"]

_SLOTS = 64  # tags per (block, call, piece): more than the tensors of any block state
_CALLS = 64  # calls of a block told apart by tag: micro-batches a pipeline keeps in flight, and more


# ------------------------------------------------------------------------------ state <-> tensors
@dataclass(frozen=True)
class StateSpec:
    """What a flat tensor list stands for: enough to rebuild the :class:`BlockState` and to
    allocate the receive buffers (shapes and dtypes)."""

    memory_depth: int | None  # None: no memory state
    conv_names: tuple[str, ...]
    kv_pos: int | None  # None: no attention cache
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]

    @property
    def nbytes(self) -> int:
        return sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size()
                   for s, d in zip(self.shapes, self.dtypes))


def flatten_state(state: BlockState) -> tuple[list[Tensor], StateSpec]:
    tensors: list[Tensor] = []
    depth, names, pos = None, (), None
    if state.memory is not None:
        mem = state.memory.memory
        depth = len(mem.weights)
        names = tuple(sorted(state.memory.conv_tails))
        tensors += [*mem.weights, *mem.momentum, *(state.memory.conv_tails[n] for n in names)]
    if state.kv is not None:
        pos = state.kv.pos
        tensors += [state.kv.k, state.kv.v]
    spec = StateSpec(depth, names, pos, tuple(tuple(t.shape) for t in tensors), tuple(t.dtype for t in tensors))
    return tensors, spec


def unflatten_state(tensors, spec: StateSpec) -> BlockState:
    it = iter(tensors)
    memory = kv = None
    if spec.memory_depth is not None:
        weights = tuple(next(it) for _ in range(spec.memory_depth))
        momentum = tuple(next(it) for _ in range(spec.memory_depth))
        tails = {n: next(it) for n in spec.conv_names}
        memory = MemoryLayerState(MemoryState(weights, momentum), tails)
    if spec.kv_pos is not None:
        kv = KVCache(next(it), next(it), spec.kv_pos)
    return BlockState(memory=memory, kv=kv)


# --------------------------------------------------------------------------------- the relay
@dataclass
class RelayStats:
    """Seconds this rank waited (reset per step) and the state bytes it hands on per block."""

    wait_forward_s: float = 0.0
    wait_backward_s: float = 0.0
    wait_sync_s: float = 0.0  # in the gradient sum over the group
    handoff_bytes: dict[tuple[int, int], int] = field(default_factory=dict)  # (block, piece) -> bytes

    @property
    def boundary_bytes(self) -> dict[int, int]:
        """Block -> bytes of state handed to the next rank per training call (all pieces)."""
        out: dict[int, int] = {}
        for (block, _), n in self.handoff_bytes.items():
            out[block] = out.get(block, 0) + n
        return out

    @property
    def waited_s(self) -> float:
        return self.wait_forward_s + self.wait_backward_s + self.wait_sync_s

    def reset(self) -> None:
        self.wait_forward_s = self.wait_backward_s = self.wait_sync_s = 0.0


class ContextParallel:
    """The cp group of this rank: slicing, the state relay, loss normalisation, gradient sums."""

    def __init__(self, group: dist.ProcessGroup, microbatches: int = 1):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        ranks = dist.get_process_group_ranks(group)
        self.prev = ranks[self.rank - 1] if self.rank > 0 else None
        self.next = ranks[self.rank + 1] if self.rank < self.size - 1 else None
        if microbatches > 1 and dist.get_backend(group) == "nccl":
            # NCCL matches point-to-point messages by order, not by tag; the backward order of the
            # pieces is the autograd engine's and is not pinned, so pieces are gloo-only for now
            raise ValueError("parallel.cp_microbatches > 1 is not supported with NCCL yet; set "
                             "parallel.cp_microbatches=1")
        self.microbatches = microbatches
        self.stats = RelayStats()
        self._specs: dict[tuple, StateSpec] = {}
        self._pending: list[tuple[dist.Work, Tensor]] = []
        self._count: tuple[dist.Work, Tensor] | None = None

    # -- data
    def shard(self, t: Tensor) -> Tensor:
        """This rank's contiguous slice of the sequence dimension (dim 1)."""
        n = t.shape[1] // self.size
        return t[:, self.rank * n:(self.rank + 1) * n]

    def count_tokens(self, labels: Tensor) -> None:
        """Start summing the valid labels over the group; call before the forward, so the sum is
        ready by the time :meth:`loss` needs it and adds no synchronisation point of its own."""
        count = (labels != -100).sum().to(torch.float64)
        self._count = (dist.all_reduce(count, group=self.group, async_op=True), count)

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """This slice's share of the mean token loss of the whole sequences: summed over the slice,
        divided by the valid tokens of the whole group, so the group's sum is the exact mean."""
        if self._count is None:
            self.count_tokens(labels)
        work, count = self._count
        self._count = None
        work.wait()
        total = lm_loss(logits, labels, reduction="sum")
        return total / count.clamp_min(1).to(total.dtype)

    def sum_over_group(self, value: Tensor) -> Tensor:
        value = value.detach().clone()
        dist.all_reduce(value, group=self.group)
        return value

    def idle_fraction(self, elapsed_s: float) -> float:
        """The group's mean fraction of ``elapsed_s`` spent waiting since the last call: for a
        neighbour's state or gradient, and in the gradient sum (where the ranks that finished
        their backward first wait for the last); resets the counters."""
        waited = torch.tensor(self.stats.waited_s, dtype=torch.float64)
        dist.all_reduce(waited, group=self.group)
        self.stats.reset()
        return float(waited) / self.size / max(elapsed_s, 1e-9)

    def sync_gradients(self, params) -> None:
        """Sum the parameters' local gradients over the group (each slice contributed its part),
        in one flat buffer per dtype. A parameter without a gradient on this rank (``M_0`` is
        used by the first slice only) counts as zero, so every rank sends the same layout."""
        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad)
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for group in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in group])
            start = time.perf_counter()
            dist.all_reduce(flat, group=self.group)
            self.stats.wait_sync_s += time.perf_counter() - start
            offset = 0
            for g in group:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    # -- point to point
    def _tag(self, key: tuple, i: int, backward: bool) -> int:
        block, piece, call = key[:3]
        return (((block * _CALLS + call) * self.microbatches + piece) * 2 + int(backward)) * _SLOTS + i + 1

    def _isend(self, tensors: list[Tensor], dst: int, key: tuple, backward: bool) -> None:
        for i, t in enumerate(tensors):
            t = t.detach().contiguous()
            self._pending.append((dist.isend(t, dst, group=self.group, tag=self._tag(key, i, backward)), t))

    def _recv(self, spec: StateSpec, src: int, key: tuple, backward: bool, device) -> list[Tensor]:
        start = time.perf_counter()
        bufs = [torch.empty(s, dtype=d, device=device) for s, d in zip(spec.shapes, spec.dtypes)]
        works = [dist.irecv(b, src, group=self.group, tag=self._tag(key, i, backward)) for i, b in enumerate(bufs)]
        for w in works:
            w.wait()
        elapsed = time.perf_counter() - start
        if backward:
            self.stats.wait_backward_s += elapsed
        else:
            self.stats.wait_forward_s += elapsed
        return bufs

    def flush(self) -> None:
        """Wait for this rank's outstanding sends (their buffers are then free)."""
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()

    def _spec_exchange(self, key: tuple, spec: StateSpec | None) -> StateSpec:
        """The first time a (block, piece, input shape) occurs, the sender describes the state it
        will send; both sides cache the description, so later steps send tensors only."""
        if key not in self._specs:
            box = [spec]
            if spec is not None:
                dist.send_object_list(box, dst=self.next, group=self.group)
            else:
                dist.recv_object_list(box, src=self.prev, group=self.group)
            self._specs[key] = box[0]
        return self._specs[key]

    def receive(self, key: tuple, x: Tensor) -> BlockState | None:
        """The entry state of the block whose input slice is ``x``. ``x`` anchors the receive in
        the graph: a backward that asks only for input gradients (``autograd.grad(inputs=...)``, as
        the pipeline schedule's does) must still run it, or rank r-1 would wait forever."""
        if self.prev is None:
            return None
        spec = self._spec_exchange(("recv",) + _layout_key(key), None)
        tensors = _Receive.apply(x, self, key, spec)
        return unflatten_state(tensors, spec)

    def send(self, key: tuple, y: Tensor, state: BlockState) -> Tensor:
        if self.next is None:
            return y
        tensors, spec = flatten_state(state)
        sent = self._spec_exchange(("send",) + _layout_key(key), spec)
        if sent != spec:
            raise RuntimeError(f"context parallelism: block state changed shape within a run ({sent} -> {spec})")
        self.stats.handoff_bytes[key[:2]] = spec.nbytes
        return _Send.apply(self, key, spec, y, *tensors)


def _layout_key(key: tuple) -> tuple:
    """A message key without its call number: what the cached state layout depends on."""
    return key[:2] + key[3:]


class _Receive(torch.autograd.Function):
    """Forward: receive the entry state from rank r-1. Backward: send its gradient back."""

    @staticmethod
    def forward(ctx, anchor, relay: ContextParallel, key, spec: StateSpec):
        ctx.relay, ctx.key = relay, key
        return tuple(relay._recv(spec, relay.prev, key, backward=False, device=anchor.device))

    @staticmethod
    def backward(ctx, *grads):
        ctx.relay._isend(list(grads), ctx.relay.prev, ctx.key, backward=True)
        return None, None, None, None


class _Send(torch.autograd.Function):
    """Forward: send the exit state to rank r+1, pass ``y`` through. Backward: receive the
    gradient of that state from rank r+1 and feed it into this rank's graph."""

    @staticmethod
    def forward(ctx, relay: ContextParallel, key, spec: StateSpec, y, *tensors):
        relay._isend(list(tensors), relay.next, key, backward=False)
        ctx.relay, ctx.key, ctx.spec, ctx.device = relay, key, spec, y.device
        return y.clone()  # not a view: FSDP2 hooks the block's output, and a view would lose it

    @staticmethod
    def backward(ctx, grad_y):
        grads = ctx.relay._recv(ctx.spec, ctx.relay.next, ctx.key, backward=True, device=ctx.device)
        return (None, None, None, grad_y, *grads)


# ------------------------------------------------------------------------------ applying it
def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The Titans blocks of a TitansLM (a ModuleList) or of a pipeline stage (a ModuleDict)."""
    blocks = model.blocks
    return list(blocks.values()) if isinstance(blocks, nn.ModuleDict) else list(blocks)


def apply_context_parallel(model: nn.Module, cp: ContextParallel) -> None:
    """Relay every block's state through ``cp`` in training calls (``block(x)``)."""
    for index, block in enumerate(blocks_of(model)):
        block.forward = _RelayedForward(block.forward, index, cp)


class _RelayedForward:
    """``block.forward`` replacement: receive the entry state, run the slice (in ``m`` pieces along
    the batch), send the exit state. Streaming calls (with a state) are passed through unchanged."""

    def __init__(self, forward, index: int, cp: ContextParallel):
        self.forward, self.index, self.cp = forward, index, cp
        self.calls = 0  # every rank of the group calls its block equally often, in the same order

    def __call__(self, x: Tensor, state: BlockState | None = None, return_state: bool = False):
        if state is not None or return_state:
            return self.forward(x, state, return_state=return_state)
        pieces = torch.tensor_split(x, min(self.cp.microbatches, x.shape[0]), dim=0)
        call, self.calls = self.calls % _CALLS, self.calls + 1
        outs = []
        for i, piece in enumerate(pieces):
            # (block, call, piece) tag the messages, so calls in flight together (a pipeline's
            # micro-batches) never take each other's; the rest keys the cached state layout
            key = (self.index, i, call, tuple(piece.shape), piece.dtype, torch.is_autocast_enabled())
            entry = self.cp.receive(key, piece)
            y, exit_state = self.forward(piece, entry, return_state=True)
            outs.append(self.cp.send(key, y, exit_state))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
