"""Native model or checkpoint -> a Hugging Face folder that ``AutoModelForCausalLM`` loads.

What a folder holds (all written here):

* ``config.json``: ``model_type: "titans"``, every ``TitansConfig`` hyper-parameter as a flat key,
  ``auto_map``, the special token ids, ``max_position_embeddings`` (the trained context), and
  ``titans_run_config`` (the training run's config, which the reverse conversion uses to continue
  training);
* ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` plus an index past ``max_shard_size``;
* ``generation_config.json`` (greedy by default, EOS stops);
* ``configuration_titans.py``, ``modeling_titans.py`` (the model's own source bundled into one file,
  see :mod:`.bundle`) and, with a tokenizer, ``tokenization_titans.py``, ``tokenizer.model``,
  ``tokenizer_config.json`` and ``special_tokens_map.json``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from titans_pretrain.hf.bundle import configuration_source, modeling_source

__all__ = ["DTYPES", "convert_checkpoint", "export_model", "find_tokenizer"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO_MAP = {"AutoConfig": "configuration_titans.TitansHFConfig",
            "AutoModelForCausalLM": "modeling_titans.TitansForCausalLM"}
TOKENIZER_AUTO_MAP = ["tokenization_titans.TitansTokenizer", None]


def _special_tokens(tokenizer_file: Path) -> dict[str, tuple[str, int]]:
    """``{"bos_token": (piece, id), ...}`` for the special pieces the sentencepiece model defines."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_file))
    found = {}
    for name, idx in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id()),
                      ("pad_token", sp.pad_id())):
        if idx >= 0:
            found[name] = (sp.id_to_piece(idx), int(idx))
    return found


def _write_tokenizer(out: Path, tokenizer_file: Path, special: dict[str, tuple[str, int]]) -> None:
    shutil.copyfile(tokenizer_file, out / "tokenizer.model")
    shutil.copyfile(Path(__file__).with_name("tokenization_titans.py"), out / "tokenization_titans.py")
    tokens = {name: piece for name, (piece, _) in special.items()}
    config = {"tokenizer_class": "TitansTokenizer", "auto_map": {"AutoTokenizer": TOKENIZER_AUTO_MAP},
              "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "model_max_length": 1_000_000_000, **tokens}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(tokens, indent=2) + "\n")


def export_model(model, out_dir: str | Path, *, tokenizer_file: str | Path | None = None,
                 dtype: str = "float32", max_shard_size: str | int = "5GB",
                 run_config: dict[str, Any] | None = None, prefill_chunk: int = 2048,
                 max_position_embeddings: int | None = None) -> Path:
    """Write ``model`` (a ``TitansLM``, left unchanged) as a Hugging Face folder at ``out_dir``.

    ``max_position_embeddings`` is the trained context (default: ``run_config``'s ``data.seq_len``):
    where extrapolation starts. Clients such as lm-evaluation-harness cut their inputs to it; the
    model itself streams past it unchanged."""
    from transformers import GenerationConfig

    from titans_pretrain.hf.configuration_titans import TitansHFConfig
    from titans_pretrain.hf.modeling_titans import TitansForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {sorted(DTYPES)}")
    if max_position_embeddings is None and run_config is not None:
        max_position_embeddings = (run_config.get("data") or {}).get("seq_len")
    if max_position_embeddings is not None and (not isinstance(max_position_embeddings, int)
                                                or max_position_embeddings < 1):
        raise ValueError(f"max_position_embeddings={max_position_embeddings!r}: the trained context must be a "
                         "positive token count (the run's data.seq_len)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    special = _special_tokens(Path(tokenizer_file)) if tokenizer_file is not None else {}
    ids = {f"{name}_id": idx for name, (_, idx) in special.items() if name != "unk_token"}
    hf_config = TitansHFConfig(**dataclasses.asdict(model.config), prefill_chunk=prefill_chunk,
                               architectures=["TitansForCausalLM"], auto_map=dict(AUTO_MAP),
                               titans_run_config=run_config, max_position_embeddings=max_position_embeddings,
                               **ids)
    target = DTYPES[dtype]
    native = model if next(model.parameters()).dtype == target else copy.deepcopy(model).to(target)
    with torch.device("meta"):  # the wrapper's own TitansLM is replaced at once: never allocated
        hf_model = TitansForCausalLM(hf_config)
    hf_model.model = native
    hf_model.config.dtype = target
    hf_model.generation_config = GenerationConfig(do_sample=False, **ids)
    hf_model.save_pretrained(out, max_shard_size=max_shard_size)
    (out / "configuration_titans.py").write_text(configuration_source())
    (out / "modeling_titans.py").write_text(modeling_source())
    if tokenizer_file is not None:
        _write_tokenizer(out, Path(tokenizer_file), special)
    return out


def find_tokenizer(run_config) -> Path | None:
    """The sentencepiece model a run trained with: the dataset manifest's, else ``data.tokenizer``."""
    from titans_pretrain.data.manifest import load_manifest

    data_path = Path(run_config.data.path)
    if (data_path / "manifest.json").is_file():
        path = load_manifest(data_path).tokenizer_path
        if path.is_file():
            return path
    if run_config.data.tokenizer and Path(run_config.data.tokenizer).is_file():
        return Path(run_config.data.tokenizer)
    return None


def convert_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, tokenizer_file: str | Path | None = None,
                       with_tokenizer: bool = True, dtype: str = "float32",
                       max_shard_size: str | int = "5GB", prefill_chunk: int = 2048) -> Path:
    """Any native checkpoint (any parallel layout, or DeepSpeed) -> Hugging Face folder, in one process.

    ``checkpoint`` may be a step folder, a ``checkpoints/`` folder or a run folder (newest complete
    checkpoint). The tokenizer is found through the run's dataset unless ``tokenizer_file`` is given;
    ``with_tokenizer=False`` exports the model alone."""
    from titans_pretrain.train.checkpoint import checkpoint_config, load_checkpoint, resolve_checkpoint_path

    folder = resolve_checkpoint_path(checkpoint)
    run_config = checkpoint_config(folder)
    if not with_tokenizer:
        tokenizer_file = None
    elif tokenizer_file is None:
        tokenizer_file = find_tokenizer(run_config)
        if tokenizer_file is None:
            raise FileNotFoundError(
                f"no tokenizer found for {folder}: data.path={run_config.data.path} has no manifest.json with "
                "its tokenizer (was the dataset moved?); pass --tokenizer FILE.model, or --no-tokenizer to "
                "export the model alone")
    model = load_checkpoint(folder)
    return export_model(model, out_dir, tokenizer_file=tokenizer_file, dtype=dtype, max_shard_size=max_shard_size,
                        run_config=run_config.to_dict(), prefill_chunk=prefill_chunk)
