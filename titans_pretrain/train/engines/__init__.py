"""The engines (native: FSDP2/DDP/TP/PP/CP; deepspeed: ZeRO) and the one builder the trainer,
`profile` and the tests use."""
from __future__ import annotations

import random
from typing import Callable

import numpy as np
import torch
from torch import nn

from titans_pretrain.config import RunConfig
from titans_pretrain.distributed.mesh import ParallelDims
from titans_pretrain.models import TitansLM
from titans_pretrain.train.engines.base import Engine, StepResult, global_norm, mean_over_dp
from titans_pretrain.train.engines.deepspeed import DeepSpeedEngine, build_partitioned
from titans_pretrain.train.engines.native import NativeEngine

__all__ = ["DeepSpeedEngine", "Engine", "NativeEngine", "StepResult", "build_engine", "global_norm",
           "mean_over_dp", "seed_everything"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_engine(cfg: RunConfig, dims: ParallelDims, device: torch.device,
                 prepare: Callable[[nn.Module], None] | None = None) -> Engine:
    """The engine around a model of ``cfg.model``, seeded with ``train.seed`` (identical weights
    on every rank). By default no rank builds the whole model (``parallel.meta_init``): the native
    engine gets it on the meta device and allocates and fills only its shards; ZeRO-3 builds it
    partitioned. Either way the weights are an eager start's, bit for bit. ``prepare`` sees the
    model before it is parallelised (``profile`` installs its scopes there)."""
    seed_everything(cfg.train.seed)
    p = cfg.parallel
    if p.engine == "deepspeed":
        if p.meta_init and p.zero_stage == 3:
            model = build_partitioned(cfg, dims, device)
        else:
            model = TitansLM(cfg.model).to(device)
    elif p.meta_init:
        with torch.device("meta"):  # no memory, no draws
            model = TitansLM(cfg.model, init=False)
    else:
        model = TitansLM(cfg.model).to(device)
    if prepare is not None:
        prepare(model)
    engine_class = DeepSpeedEngine if p.engine == "deepspeed" else NativeEngine
    return engine_class(model, cfg, dims, device)
