"""Hugging Face folder -> a native checkpoint that ``titans-pretrain train`` resumes from.

The HF format holds weights, not optimizer moments or a data position, so the written checkpoint is
a *start*: step 0, the exported weights, a fresh AdamW state and schedule, the data stream at its
beginning. ``train`` then continues training these weights like any resumed run (any layout: DCP
reshards on load). The checkpointer writes it (``train.checkpoint.write_start_checkpoint``: the
same saved state, atomic save, manifest and ``latest`` as a native-engine save), so nothing
downstream can tell it apart.

The run config comes from ``titans_run_config`` in ``config.json`` (recorded at export), else from
``--config``; dotted overrides apply on top (``data.path=...``, ``train.steps=...``). The ``model``
section always comes from the HF folder: the weights fix it.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from titans_pretrain.train.checkpoint import write_start_checkpoint

__all__ = ["hf_to_native", "load_hf_weights", "titans_config_from_json", "write_start_checkpoint"]


def titans_config_from_json(hf_dir: Path):
    """``TitansConfig`` from an exported ``config.json`` (keys it lacks keep their defaults, or read
    as ``LEGACY_DEFAULTS`` where the key was added after the export)."""
    from titans_pretrain.models import TitansConfig
    from titans_pretrain.models.titans import LEGACY_DEFAULTS

    path = hf_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{hf_dir} has no config.json: not a Hugging Face model folder")
    raw = json.loads(path.read_text())
    if raw.get("model_type") != "titans":
        raise ValueError(f"{path}: model_type is {raw.get('model_type')!r}, not 'titans'; only Titans exports "
                         "convert back")
    names = {f.name for f in dataclasses.fields(TitansConfig)}
    return TitansConfig(**{**LEGACY_DEFAULTS, **{k: v for k, v in raw.items() if k in names}}), raw


def load_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """The state dict of an exported folder (one safetensors file or an index of shards), keys
    without the wrapper's ``model.`` prefix, tensors as stored (no dtype change)."""
    from safetensors.torch import load_file

    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{hf_dir} has neither model.safetensors nor model.safetensors.index.json")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        for key, tensor in load_file(str(hf_dir / name)).items():
            if not key.startswith("model."):
                raise ValueError(f"{hf_dir / name}: unexpected tensor {key!r} (Titans exports prefix every key "
                                 "with 'model.')")
            state[key[len("model."):]] = tensor
    return state


def _run_config(hf_raw: dict, model_config, run_dir: str | Path, config_path: str | None, overrides: list[str]):
    from titans_pretrain.config import ConfigError, apply_overrides, config_from_dict
    import yaml

    if any(o.split("=", 1)[0].strip().startswith("model.") for o in overrides):
        raise ConfigError("model.* overrides are not allowed: the model's shape comes from the HF folder's "
                          "config.json (its weights fix it)")
    if config_path is not None:
        raw = yaml.safe_load(Path(config_path).read_text()) or {}
    elif hf_raw.get("titans_run_config"):
        raw = dict(hf_raw["titans_run_config"])
    else:
        raise ConfigError("this HF folder records no training config (titans_run_config); pass --config "
                          "CONFIG.yaml for the data, optimizer and schedule of the continued run")
    raw = apply_overrides(raw, list(overrides))
    raw["model"] = dataclasses.asdict(model_config)
    raw["run_dir"] = str(run_dir)
    return config_from_dict(raw)


def hf_to_native(hf_dir: str | Path, run_dir: str | Path, *, config_path: str | None = None,
                 overrides: list[str] | tuple = (), log=print) -> Path:
    """Write ``run_dir/checkpoints/step_00000000`` (and ``run_dir/config.yaml``) from an HF folder.

    Returns the checkpoint folder. ``titans-pretrain train CONFIG run_dir=RUN_DIR`` (or the written
    ``run_dir/config.yaml``) then resumes from it."""
    from titans_pretrain.models import TitansLM

    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    model_config, hf_raw = titans_config_from_json(hf_dir)
    cfg = _run_config(hf_raw, model_config, run_dir, config_path, list(overrides))
    model = TitansLM(model_config)
    state = load_hf_weights(hf_dir)
    if model_config.tie_embeddings:
        state.setdefault("lm_head.weight", state.get("embed.weight"))
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"{hf_dir}: weights do not match its config.json (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    return write_start_checkpoint(model, cfg, run_dir, source=str(hf_dir), log=log)
