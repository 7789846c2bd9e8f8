"""Move Titans weights between our native ``TitansLM`` and its Megatron-core twin (both ways).

The Megatron side is the full (tensor-parallel size 1) state dict of
``titans_pretrain.integrations.megatron.titans_gpt_model(titans)``: load it into a TP=1 model
and save with ``dist_checkpointing`` to get a checkpoint that loads at any TP size, or take a
Megatron checkpoint of any TP size, load it into a TP=1 model, and convert its ``state_dict()``.

Checkpoint files, both ways:

* :func:`save_megatron_checkpoint`: native weights -> a Megatron ``dist_checkpointing`` folder
  (written by Megatron itself, so it loads at any TP/PP size), plus ``titans_config.json``. Runs in a
  process with Megatron's ``parallel_state`` at TP=1 (any Megatron job, or :func:`megatron_process`).
* :func:`read_megatron_checkpoint` / :func:`megatron_checkpoint_to_native`: a Megatron ``torch_dist``
  checkpoint of any TP/PP size (ours, or a Megatron-LM ``iter_*`` folder; optimizer entries are
  skipped) -> full tensors -> a native ``TitansLM``. Plain ``torch.distributed.checkpoint`` reads, no
  Megatron and no process group needed. :func:`megatron_checkpoint_to_run` writes it as a native
  run checkpoint that ``titans-pretrain train`` resumes from (fresh optimizer, step 0).
* From a native run/checkpoint folder: ``titans_pretrain.load_checkpoint(path)`` then
  :func:`save_megatron_checkpoint` (``model.state_dict()``, ``model.config``).

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

import contextlib
import dataclasses
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

from titans_pretrain.models.titans import TitansConfig

__all__ = [
    "check_convertible",
    "load_into_megatron",
    "megatron_checkpoint_to_native",
    "megatron_checkpoint_to_run",
    "megatron_process",
    "megatron_to_native",
    "native_to_megatron",
    "read_megatron_checkpoint",
    "save_megatron_checkpoint",
]

TITANS_CONFIG_FILE = "titans_config.json"



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
    mac = [("norm.", "input_layernorm."), ("memory.", "self_attention.memory."),
           ("memory_in_norm.", "self_attention.memory_in_norm.")]
    return mac + ([("memory_out_norm.", "self_attention.memory_out_norm.")] if titans.mac_output_gate == "sigmoid" else [])


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


# ------------------------------------------------------------------------------ checkpoint files
@contextlib.contextmanager
def megatron_process():
    """A one-process gloo group and Megatron ``parallel_state`` at TP=1 for the duration, unless
    torch.distributed is already initialised (then the caller's state is used as is)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
            yield
        finally:
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()


@contextlib.contextmanager
def _writer_without_cuda():
    """Megatron's checkpoint writer calls ``torch.cuda.synchronize()`` after its device-to-host copies
    and puts its failure flag on ``torch.cuda.current_device()``. On a machine without CUDA there is
    nothing to wait for and the flag belongs on the CPU: for the duration of the save only, and only
    when CUDA is unavailable, those two calls say so (conversions then run on CPU-only machines)."""
    if torch.cuda.is_available():
        yield
        return
    saved = torch.cuda.synchronize, torch.cuda.current_device
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_device = lambda: "cpu"
    try:
        yield
    finally:
        torch.cuda.synchronize, torch.cuda.current_device = saved


def save_megatron_checkpoint(native: dict[str, Tensor], titans: TitansConfig, ckpt_dir: str | Path, *,
                             params_dtype: torch.dtype = torch.float32) -> Path:
    """Native weights -> a Megatron ``dist_checkpointing`` folder (+ ``titans_config.json``).

    Needs Megatron's ``parallel_state`` initialised with tensor-parallel size 1 (wrap a script in
    :func:`megatron_process`); the saved folder loads at any TP size. Megatron's writer starts
    worker processes: call it under ``if __name__ == "__main__":``."""
    from megatron.core import dist_checkpointing, parallel_state

    from titans_pretrain.integrations.megatron import titans_gpt_model, titans_transformer_config

    if not parallel_state.model_parallel_is_initialized() or \
            parallel_state.get_tensor_model_parallel_world_size() != 1:
        raise RuntimeError("save_megatron_checkpoint builds the full (TP=1) model: initialise Megatron's "
                           "parallel_state with tensor_model_parallel_size=1 (e.g. `with megatron_process():`); "
                           "dist_checkpointing reshards it for any TP size on load")
    check_convertible(titans)
    model = titans_gpt_model(titans, titans_transformer_config(titans, use_cpu_initialization=True,
                                                               params_dtype=params_dtype))
    load_into_megatron(model, {k: v.to(params_dtype) for k, v in native.items()}, titans)
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    with _writer_without_cuda():
        dist_checkpointing.save(model.sharded_state_dict(), str(ckpt_dir))
    if int(os.environ.get("RANK", "0")) == 0:
        (ckpt_dir / TITANS_CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(titans), indent=1))
    return ckpt_dir


def _resolve_megatron_dir(path: str | Path) -> Path:
    """A checkpoint folder, or a Megatron-LM save root (``latest_checkpointed_iteration.txt``)."""
    path = Path(path)
    tracker = path / "latest_checkpointed_iteration.txt"
    if tracker.is_file():
        it = tracker.read_text().strip()
        path = path / ("release" if it == "release" else f"iter_{int(it):07d}")
    meta = path / "metadata.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{path} has no metadata.json: not a Megatron dist_checkpointing folder "
                                "(legacy torch.save checkpoints: load them into a TP=1 model and use "
                                "megatron_to_native on its state_dict())")
    backend = json.loads(meta.read_text()).get("sharded_backend")
    if backend != "torch_dist":
        raise ValueError(f"{path}: sharded_backend {backend!r}; only 'torch_dist' (Megatron's default) is read here")
    return path


_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")


def read_megatron_checkpoint(ckpt_dir: str | Path) -> dict[str, Tensor]:
    """The model tensors of a Megatron ``torch_dist`` checkpoint of any TP/PP layout, full size, under
    the keys of a TP=1 model's ``state_dict()`` (Megatron stores the layers stacked on a leading
    layer axis: unstacked here). No process group needed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = _resolve_megatron_dir(ckpt_dir)
    reader = dcp.FileSystemReader(str(path))
    metadata = reader.read_metadata()
    state = {k: torch.empty(m.size, dtype=m.properties.dtype)
             for k, m in metadata.state_dict_metadata.items()
             if isinstance(m, TensorStorageMetadata) and k.startswith(_MODEL_PREFIXES)}
    if not state:
        raise ValueError(f"{path}: no model tensors (keys starting with {_MODEL_PREFIXES})")
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=reader, no_dist=True)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("decoder.layers."):
            rest = key[len("decoder.layers."):]
            for i, t in enumerate(value.unbind(0)):
                out[f"decoder.layers.{i}.{rest}"] = t
        else:
            out[key] = value
    return out


def _titans_config(path: Path, titans: TitansConfig | None) -> TitansConfig:
    if titans is not None:
        return titans
    cfg_file = path / TITANS_CONFIG_FILE
    if not cfg_file.is_file():
        raise ValueError(f"{path} has no {TITANS_CONFIG_FILE} (not written by save_megatron_checkpoint): pass the "
                         "TitansConfig the Megatron model was built from")
    return TitansConfig(**json.loads(cfg_file.read_text()))


def megatron_checkpoint_to_native(ckpt_dir: str | Path, titans: TitansConfig | None = None):
    """A Megatron checkpoint of Titans layers -> a native ``TitansLM`` (fp32, eval mode)."""
    from titans_pretrain.models import TitansLM

    path = _resolve_megatron_dir(ckpt_dir)
    titans = _titans_config(path, titans)
    state = megatron_to_native(read_megatron_checkpoint(path), titans)
    model = TitansLM(titans)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


def megatron_checkpoint_to_run(ckpt_dir: str | Path, run_dir: str | Path, config_path: str | Path, *,
                               overrides: list[str] | tuple = (), titans: TitansConfig | None = None,
                               log=print) -> Path:
    """A Megatron checkpoint -> ``run_dir/checkpoints/step_00000000``, resumable by ``titans-pretrain
    train``. ``config_path`` gives the run's data, optimizer and schedule (a Megatron checkpoint has
    none of ours); its ``model`` section is replaced by the checkpoint's ``TitansConfig``."""
    import yaml

    from titans_pretrain.config import ConfigError, apply_overrides, config_from_dict
    from titans_pretrain.train.checkpoint import write_start_checkpoint

    if any(o.split("=", 1)[0].strip().startswith("model.") for o in overrides):
        raise ConfigError("model.* overrides are not allowed: the model's shape comes from the Megatron checkpoint")
    model = megatron_checkpoint_to_native(ckpt_dir, titans)
    raw = apply_overrides(yaml.safe_load(Path(config_path).read_text()) or {}, list(overrides))
    raw["model"] = dataclasses.asdict(model.config)
    raw["run_dir"] = str(run_dir)
    model.train()
    return write_start_checkpoint(model, config_from_dict(raw), run_dir, source=str(ckpt_dir), log=log)
