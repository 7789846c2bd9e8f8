"""DeepSpeed ZeRO-1/2/3 (and ZeRO-2 with CPU offload) with 2 gloo ranks vs plain single-device PyTorch on the same global
batch: same losses, gradients, gradient norms and weights."""
import pytest

from trainer_workers import check_against_reference as _check
from trainer_spawn import spawn_ranks
from trainer_workers import deepspeed_cases, plain_reference


@pytest.mark.slow
def test_zero_stages_match_single_device():
    ref = plain_reference([])
    cases = {"zero1": ["parallel.zero_stage=1"], "zero2": ["parallel.zero_stage=2"],
             "zero3": ["parallel.zero_stage=3"],  # partitioned start (parallel.meta_init)
             "zero3-eager-start": ["parallel.zero_stage=3", "parallel.meta_init=false"],
             "zero2+offload": ["parallel.zero_stage=2", "parallel.cpu_offload=true"]}
    ranks = spawn_ranks(deepspeed_cases, 2, cases)
    for name in cases:
        for r in ranks:
            _check(r[name], ref)
