"""A greedy continuation of `train.sample_prompt` at the end, written to `sample.txt`."""
from __future__ import annotations

from pathlib import Path

import torch

from titans_pretrain.config import RunConfig
from titans_pretrain.data.tokenizer import Tokenizer
from titans_pretrain.train.callbacks.base import Callback


class Sampling(Callback):
    def __init__(self, cfg: RunConfig, tokenizer_path: Path, run_dir: Path, is_main: bool):
        self.cfg, self.tokenizer_path, self.run_dir, self.is_main = cfg, tokenizer_path, run_dir, is_main

    def on_end(self, trainer) -> None:
        self.sample(trainer)

    def sample(self, trainer) -> str | None:
        """Every rank runs it: an FSDP forward is collective."""
        prompt, n = self.cfg.train.sample_prompt, self.cfg.train.sample_tokens
        if n == 0:
            return None
        tok = Tokenizer(self.tokenizer_path)
        ids = torch.tensor([tok.encode(prompt)], device=trainer.device)
        with torch.no_grad():
            out = trainer.engine.generate(ids, n)
        if out is None:
            trainer.log("[sample] skipped: generation runs on one device; sample from "
                        "titans_pretrain.load_checkpoint(run_dir) instead")
            return None
        text = prompt + tok.decode(out[0].tolist())  # generate returns the new tokens
        if self.is_main:
            (self.run_dir / "sample.txt").write_text(text)
            trainer.log(f"[sample] {text!r}")
        return text
