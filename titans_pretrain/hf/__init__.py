"""Hugging Face export: native checkpoints -> transformers folders (``AutoModelForCausalLM`` with
``trust_remote_code=True``) and back. See ``docs/hf.md``.

Importing this package does not import transformers; :func:`export_model` / :func:`convert_checkpoint`
need the ``[hf]`` extra, :func:`hf_to_native` only safetensors.
"""
from titans_pretrain.hf.export import convert_checkpoint, export_model
from titans_pretrain.hf.import_hf import hf_to_native

__all__ = ["convert_checkpoint", "export_model", "hf_to_native"]
