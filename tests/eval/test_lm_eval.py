"""lm-evaluation-harness on the HF export, offline, on the shipped tasks: the scores and every
response are the same at batch size 4 (left-padded generate_until, right-padded log-likelihoods)
as at batch size 1."""
from __future__ import annotations

import math

import pytest
import torch

from titans_pretrain.eval.lm_eval_tasks import TASK_NAMES, build_documents, write_tasks
from titans_pretrain.models import TitansConfig, TitansLM

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is an optional extra (pip install -e '.[lmeval]')")


def test_shipped_tasks_are_deterministic_and_well_formed():
    docs = build_documents(0)
    assert docs == build_documents(0) and docs != build_documents(1)
    assert set(docs) == set(TASK_NAMES)
    for d in docs["titans_cloze"]:
        assert len(d["choices"]) == 4 and len(set(d["choices"])) == 4 and 0 <= d["label"] < 4
    assert all(len(d["text"]) == 2000 for d in docs["titans_stdlib_ppl"])
    assert all(d["target"] and "\n" not in d["target"] for d in docs["titans_complete_line"])


def test_batch_size_4_equals_batch_size_1(tmp_path, needle_tokenizer, single_thread):
    from titans_pretrain.eval.harness import run_lm_eval

    torch.manual_seed(0)
    model = TitansLM(TitansConfig(variant="mac", vocab_size=needle_tokenizer.vocab_size, d_model=32, n_layers=2,
                                  n_heads=2, chunk_size=4, segment_len=8, n_persistent=2, memory_expansion=2,
                                  theta_max=0.3)).eval()
    tasks = write_tasks(tmp_path / "tasks")
    runs = {bs: run_lm_eval(model, needle_tokenizer.model_file, tasks, work_dir=tmp_path / f"bs{bs}",
                            trained_context=64, include_paths=[tmp_path / "tasks"], batch_size=bs, limit=6,
                            responses=True)
            for bs in (1, 4)}
    one, four = runs[1], runs[4]
    assert set(one) == set(TASK_NAMES)
    for task in TASK_NAMES:
        assert one[task]["samples"] == 6
        for metric, value in one[task]["metrics"].items():
            if value is not None:
                assert math.isclose(four[task]["metrics"][metric], value, rel_tol=1e-5), (task, metric)
    generated = one["titans_complete_line"]["responses"]
    assert generated == four["titans_complete_line"]["responses"]  # greedy, token for token
    assert any(r != [""] for r in generated)  # the model did produce text
    for a, b in zip(one["titans_cloze"]["responses"], four["titans_cloze"]["responses"]):
        assert [x[1] for x in a] == [x[1] for x in b]
        torch.testing.assert_close(torch.tensor([x[0] for x in a]), torch.tensor([x[0] for x in b]),
                                   rtol=1e-5, atol=1e-4)
