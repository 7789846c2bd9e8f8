"""Zero-shot tasks through lm-evaluation-harness, in process, on the Hugging Face export.

The checkpoint is exported with ``convert-hf``'s own code (:func:`titans_pretrain.hf.export.export_model`)
and loaded back through ``AutoModelForCausalLM`` with its remote code, so lm-eval runs exactly what a
user of the exported folder runs. lm-eval right-pads log-likelihood batches (causal: the pads never
reach a real position) and left-pads ``generate_until`` batches with a mask, which the model runs
row by row (``forward_padded``), so scores do not depend on ``--batch-size``. lm-eval cuts inputs to
the config's ``max_position_embeddings``, the trained context.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

__all__ = ["MISSING", "run_lm_eval"]

MISSING = ("lm-evaluation-harness is not installed: pip install -e '.[lmeval]' (lm-eval with its "
           "transformers backend)")


def _summary(task_results: dict) -> dict:
    """lm-eval's ``"metric,filter"`` keys as ``{metric: value}`` (stderr as ``metric_stderr``)."""
    out = {}
    for key, value in task_results.items():
        if "," not in key:
            continue
        metric, _ = key.split(",", 1)
        out[metric] = value if isinstance(value, (int, float)) else None
    return out


def run_lm_eval(model, tokenizer_file: str | Path, tasks: list[str], *, work_dir: Path,
                trained_context: int | None = None, include_paths: list[str | Path] = (), batch_size: int = 1,
                limit: int | None = None, device: str = "cpu", log: Callable[[str], None] = print,
                responses: bool = False) -> dict:
    """Export ``model`` (a ``TitansLM``) to ``work_dir/hf``, run lm-eval ``tasks`` on it and return
    ``{task: {"metrics": {...}, "samples": n, ...}}``. The tasks are found in ``include_paths`` and
    lm-eval's own registry (whose datasets may need a download). ``responses=True`` adds each
    document's filtered model responses (``"responses"``), to compare runs sample by sample."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ImportError(f"{MISSING} ({exc})") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from titans_pretrain.hf.export import export_model

    folder = export_model(model, Path(work_dir) / "hf", tokenizer_file=tokenizer_file,
                          max_position_embeddings=trained_context)
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).to(device).eval()
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    lm = HFLM(pretrained=hf, tokenizer=tok, batch_size=batch_size, device=device)
    manager = TaskManager(include_path=[str(p) for p in include_paths] or None)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise ValueError(f"lm-eval tasks {unknown} are neither in the --include-path folders nor in lm-eval's "
                         "registry: check the names (lm_eval --tasks list) or pass --include-path DIR")
    log(f"[lm-eval] {', '.join(tasks)} at batch size {batch_size}" + (f", limit {limit}" if limit else ""))
    res = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=responses,
                          bootstrap_iters=0, batch_size=batch_size)
    out = {}
    for task, values in res["results"].items():
        n = res.get("n-samples", {}).get(task, {})
        out[task] = {"metrics": _summary(values), "samples": n.get("effective"), "limit": limit,
                     "batch_size": batch_size, "version": res.get("versions", {}).get(task)}
        if responses:
            docs = sorted(res["samples"][task], key=lambda d: d["doc_id"])
            out[task]["responses"] = [d["filtered_resps"] for d in docs]
        shown = ", ".join(f"{k} {v:.4f}" for k, v in out[task]["metrics"].items()
                          if v is not None and not k.endswith("_stderr"))
        log(f"[lm-eval] {task}: {shown}")
    return out
