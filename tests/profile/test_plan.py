"""`titans-pretrain plan`: the per-rank memory plan, from the config alone.

(a) a 7B model is planned without being materialised, and its parameter count is the meta model's;
(b) the predicted peak is within 10% of the peak resident memory of a real training step on CPU;
(c) the command line prints the table and what fits, and names a bad key.
"""
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from titans_pretrain import cli
from titans_pretrain.config import ConfigError, load_config
from titans_pretrain.models import TitansConfig, TitansLM
from titans_pretrain.profile.plan import GiB, MiB, count_params, largest_fit, memory_plan, usable_bytes

ROOT = Path(__file__).resolve().parents[2]
SEVEN_B = ["model.variant=mac", "model.d_model=4096", "model.n_layers=32", "model.n_heads=32",
           "model.vocab_size=32000", "data.seq_len=4096", "train.micro_batch_size=1",
           "train.global_batch_tokens=1048576", "parallel.activation_checkpointing=true"]


def test_a_7b_model_is_planned_without_materialising_it():
    cfg = load_config(None, SEVEN_B)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, lifetime peak
    start = time.perf_counter()
    plan = memory_plan(cfg, 8)
    elapsed = time.perf_counter() - start
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
    assert elapsed < 30 and grown < 1 * GiB  # 28 GB of fp32 weights were never allocated
    with torch.device("meta"):
        meta = TitansLM(TitansConfig(variant="mac", d_model=4096, n_layers=32, n_heads=32, vocab_size=32000),
                        init=False)
    assert plan.n_params == meta.num_params() == count_params(cfg.model).total
    # FSDP over 8: the fp32 states are 16 N / 8, but the gradients stay whole while accumulating
    assert plan.params == pytest.approx(4 * plan.n_params / 8, rel=1e-6)
    assert plan.optimizer == pytest.approx(8 * plan.n_params / 8, rel=1e-6)
    assert plan.grad_accum == 32 and plan.grads == pytest.approx(4 * plan.n_params, rel=1e-6)
    assert plan.peak_ac < plan.peak_no_ac and plan.peak() == plan.peak_ac
    # tp and cp divide what they split; bf16 on GPU, fp32 on CPU
    tp2 = memory_plan(load_config(None, SEVEN_B + ["parallel.tp=2"]), 8)
    assert tp2.block_activations < 0.55 * plan.block_activations and tp2.loss == plan.loss // 2
    cpu = memory_plan(cfg, 8, device="cpu")
    assert cpu.dtype == "fp32" and cpu.block_activations > plan.block_activations


# ------------------------------------------------------------------------- against measured peaks
MEASURE = r"""
import ctypes, gc, json, sys
from titans_pretrain.config import load_config, resolve_layout
from titans_pretrain.distributed.mesh import build_mesh, init_distributed, shutdown_distributed
from titans_pretrain.profile.memory import PeakMemory
from titans_pretrain.profile.runner import random_batches
from titans_pretrain.train.engines import build_engine

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

def engine(overrides):
    cfg = load_config(None, [*overrides, "parallel.meta_init=false"])
    layout = resolve_layout(cfg, 1)
    eng = build_engine(cfg, build_mesh(layout, device), device)
    return eng, random_batches(cfg, layout.micro_batch_size, layout.grad_accum, device, 0)

device = init_distributed("gloo")
args = sys.argv[1:]
# every code path once on a tiny model of the same kind (imports, autograd, optimizer), then freed
keep = [a for a in args if a.split("=")[0] in ("model.variant", "parallel.activation_checkpointing")]
eng, batches = engine(keep + ["model.d_model=16", "model.n_heads=2", "model.n_layers=1", "model.vocab_size=64",
                              "data.seq_len=32", "train.global_batch_tokens=32", "train.micro_batch_size=1",
                              "model.chunk_size=8", "model.segment_len=16", "model.window=16"])
eng.train_step(batches)
del eng, batches
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
base = rss()  # the runtime alone: what the plan does not count
eng, batches = engine(args)
eng.train_step(batches)  # the first step creates the optimizer state
memory = PeakMemory(device)
memory.reset()
eng.train_step(batches)
peak, kind = memory.peak()
print(json.dumps({"peak": peak - base, "kind": kind}))
shutdown_distributed()
"""


def _small(variant, d, layers, heads, vocab, seq, batch, *extra):
    return [f"model.variant={variant}", f"model.d_model={d}", f"model.n_layers={layers}",
            f"model.n_heads={heads}", f"model.vocab_size={vocab}", f"data.seq_len={seq}",
            f"train.micro_batch_size={batch}", f"train.global_batch_tokens={seq * batch}",
            "train.steps=10", "optim.warmup_steps=1", *extra]


SMALL = {
    "lmm": _small("lmm", 256, 2, 4, 2048, 1024, 2, "parallel.activation_checkpointing=false"),
    "mac+ac": _small("mac", 256, 2, 4, 2048, 1024, 2, "model.segment_len=256",
                     "parallel.activation_checkpointing=true"),
    "mag": _small("mag", 128, 3, 4, 2048, 2048, 1, "model.window=256", "parallel.activation_checkpointing=false"),
}


def _measure(overrides):
    # mmap every allocation of 64 KiB or more, so that freeing a tensor returns it: RSS follows
    # the live tensors (the heap would otherwise keep its high-water mark)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", MEASURE, *overrides], env=env, capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's peak RSS reset")
def test_predicted_peak_is_within_10_percent_of_a_measured_cpu_step():
    """Forward, backward and AdamW step of the real engine (FSDP2 on one process, fp32), peak RSS
    above the runtime's baseline, against the plan's peak for device cpu."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        measured = dict(zip(SMALL, pool.map(_measure, SMALL.values())))
    rows = []
    for name, overrides in SMALL.items():
        assert measured[name]["kind"] == "rss_peak"
        plan = memory_plan(load_config(None, overrides), 1, device="cpu")
        rows.append((name, measured[name]["peak"] / MiB, plan.peak() / MiB))
    report = "\n".join(f"{n}: measured {m:.1f} MiB, planned {p:.1f} MiB ({p / m - 1:+.1%})" for n, m, p in rows)
    print(report)
    for name, m, p in rows:
        assert abs(p / m - 1) < 0.10, report


def test_what_fits_grows_with_the_device_and_respects_the_units():
    cfg = load_config(str(ROOT / "configs" / "mac_760m.yaml"))
    small = largest_fit(cfg, 8, usable_bytes(24), "cuda")
    large = largest_fit(cfg, 8, usable_bytes(80), "cuda")
    assert large[0] >= small[0] >= 1 and large[1] >= small[1]
    assert large[1] % cfg.model.segment_len == 0
    plan = memory_plan(cfg, 8)
    assert plan.peak() <= usable_bytes(80)
    assert largest_fit(cfg, 8, 1 * MiB, "cuda") == (0, 0)
    with pytest.raises(ConfigError, match="data-parallel size"):
        memory_plan(cfg, 3)


# ------------------------------------------------------------------------------------ command line
def plan_cli(monkeypatch, capsys, *argv):
    argv = ["plan", *argv]
    monkeypatch.setattr(sys, "argv", ["titans-pretrain", *argv])  # cli.main rewrites sys.argv
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_prints_the_plan_and_what_fits(monkeypatch, capsys):
    code, out, err = plan_cli(monkeypatch, capsys, str(ROOT / "configs" / "mac_760m.yaml"),
                              "--nproc", "8", "--device-memory", "80")
    assert code == 0, err
    for row in ("parameters (fp32)", "gradients", "optimizer state", "gathered parameters",
                "activations without checkpointing", "activations with checkpointing",
                "memory layer's saved states", "logits and loss", "context-parallel buffers",
                "peak with checkpointing  <- this config", "largest micro-batch at seq_len 4096: ",
                "largest seq_len at micro-batch 4: "):
        assert row in out, (row, out)
    assert "-> fits" in out
    # options after the overrides, and a layout that no longer fits a small device
    code, out, err = plan_cli(monkeypatch, capsys, str(ROOT / "configs" / "mac_760m.yaml"),
                              "parallel.activation_checkpointing=false", "--nproc", "8",
                              "--device-memory", "16", "--device", "cuda")
    assert code == 0, err
    assert "peak without checkpointing  <- this config" in out and "DOES NOT FIT" in out


@pytest.mark.parametrize("argv, message", [
    (["model.colour=red"], "model.colour"),
    (["train.micro_batch_size=three"], "train.micro_batch_size"),
    (["--nproc", "3"], "data-parallel size (3)"),
    (["--nproc", "8", "--device-memory", "0"], "--device-memory"),
])
def test_cli_bad_input_names_the_key(monkeypatch, capsys, argv, message):
    code, out, err = plan_cli(monkeypatch, capsys, str(ROOT / "configs" / "mac_760m.yaml"), *argv)
    assert code == 2 and message in err and "config error" in err, err


def test_launch_slurm_prints_the_plan_before_the_script(monkeypatch, capsys, tmp_path):
    argv = ["launch", "slurm", str(ROOT / "configs" / "debug.yaml"), "--nodes", "2", "--gpus-per-node", "4",
            "--dry-run", f"run_dir={tmp_path}/r", "train.global_batch_tokens=1024"]
    monkeypatch.setattr(sys, "argv", ["titans-pretrain", *argv])
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan: 8 rank(s) = dp_replicate 1 x dp_shard 8") and "cuda bf16" in out
    assert out.index("peak with checkpointing") < out.index("#SBATCH")
