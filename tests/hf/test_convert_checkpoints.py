"""Checkpoints written by real training runs convert to HF folders and back.

A one-process run, a two-process (FSDP) run and a DeepSpeed run are converted with the CLI; the
one-process export loads in a fresh process where titans_pretrain cannot be imported; HF -> native
gives back identical tensors and `train` resumes from it (on two processes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from titans_pretrain import load_checkpoint
from titans_pretrain.cli import main as cli_main
from titans_pretrain.data.tokenizer import Tokenizer
from hf_helpers import REPO, run_cli

TEXT = "def  f(x):\n\treturn x  # héllo, 漢字\n"


def convert(*args: str) -> int:
    """`titans-pretrain ARGS` in this process (saves a launch); restores sys.argv."""
    saved = list(sys.argv)
    try:
        return cli_main(list(args))
    finally:
        sys.argv[:] = saved


def hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        return model(ids).logits


def test_one_process_run_loads_in_a_fresh_process(run_1proc, data_dir, tmp_path):
    out = tmp_path / "hf"
    assert convert("convert-hf", str(run_1proc), str(out)) == 0
    for name in ("config.json", "model.safetensors", "generation_config.json", "configuration_titans.py",
                 "modeling_titans.py", "tokenization_titans.py", "tokenizer.model", "tokenizer_config.json",
                 "special_tokens_map.json"):
        assert (out / name).is_file(), name
    # the trained context (configs/debug.yaml: seq_len 32); the 37-token inputs below stream past it
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 32

    native = load_checkpoint(run_1proc)
    ids = torch.randint(0, native.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(0))
    torch.save({"ids": ids, "text": TEXT, "new_tokens": 10}, tmp_path / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(REPO / "tests/hf/fresh_load.py"), str(out), str(tmp_path / "inputs.pt"),
                           str(tmp_path / "result.json")], cwd=tmp_path, env=dict(env, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["blocked"] and result["loaded"] == []
    assert result["class"].startswith("transformers_modules")
    tensors = torch.load(str(tmp_path / "result.json") + ".pt")
    with torch.no_grad():
        expected = native(ids).logits
    torch.testing.assert_close(tensors["logits"], expected, rtol=0, atol=1e-5)
    assert torch.equal(tensors["generated"][:, 37:], native.generate(ids, 10))

    tokenizer = Tokenizer(data_dir / "tokenizer.model")
    assert result["encoded"] == tokenizer.encode(TEXT)
    assert result["decoded"] == TEXT
    assert (result["eos"], result["pad"]) == (tokenizer.eos_id, tokenizer.pad_id)


@pytest.mark.parametrize("run", ["run_2proc", "run_deepspeed"])
def test_multi_process_and_deepspeed_runs_convert(run, request, tmp_path):
    run_dir = request.getfixturevalue(run)
    out = tmp_path / "hf"
    assert convert("convert-hf", str(run_dir / "checkpoints"), str(out), "--max-shard-size", "100KB") == 0
    assert (out / "model.safetensors.index.json").is_file()
    native = load_checkpoint(run_dir)
    ids = torch.randint(0, native.config.vocab_size, (1, 40))
    with torch.no_grad():
        expected = native(ids).logits
    torch.testing.assert_close(hf_logits(out, ids), expected, rtol=0, atol=1e-5)


def test_hf_to_native_round_trip_and_resume(run_1proc, tmp_path):
    hf = tmp_path / "hf"
    assert convert("convert-hf", str(run_1proc), str(hf)) == 0
    run3 = tmp_path / "run3"
    assert convert("convert-hf", "--to-native", str(hf), str(run3), "train.steps=3") == 0
    assert (run3 / "checkpoints" / "latest").read_text().strip() == "step_00000000"

    before, after = load_checkpoint(run_1proc).state_dict(), load_checkpoint(run3).state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key

    proc = run_cli("train", str(run3 / "config.yaml"), "--nproc", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"resumed from {run3 / 'checkpoints' / 'step_00000000'} at step 0" in proc.stdout
    assert (run3 / "checkpoints" / "step_00000003").is_dir()
    steps = [json.loads(line)["step"] for line in (run3 / "metrics.jsonl").read_text().splitlines()]
    assert sorted(set(steps)) == [1, 2, 3]  # trained from the imported step 0 on

    # a second import into the same run folder would be shadowed by its checkpoints: refused
    assert convert("convert-hf", "--to-native", str(hf), str(run3)) == 2


def test_cli_errors_name_the_fix(run_1proc, tmp_path, capsys):
    hf = tmp_path / "hf"
    assert convert("convert-hf", str(run_1proc), str(hf), "--no-tokenizer") == 0
    assert not (hf / "tokenizer.model").exists()
    cases = [
        (["convert-hf", str(run_1proc), str(tmp_path / "a"), "--tokenizer", "x.model", "--no-tokenizer"],
         "contradict"),
        (["convert-hf", str(run_1proc), str(tmp_path / "b"), "train.steps=3"], "only with --to-native"),
        (["convert-hf", str(tmp_path / "nothing"), str(tmp_path / "c")], "does not exist"),
        (["convert-hf", str(tmp_path), str(tmp_path / "c")], "is not a checkpoint"),
        (["convert-hf", "--to-native", str(hf), str(tmp_path / "d"), "model.d_model=64"], "model.* overrides"),
        (["convert-hf", "--to-native", str(tmp_path / "nothing"), str(tmp_path / "e")], "no config.json"),
    ]
    for argv, message in cases:
        assert convert(*argv) == 2, argv
        assert message in capsys.readouterr().err, argv
