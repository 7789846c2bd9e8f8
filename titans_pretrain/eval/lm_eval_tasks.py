"""Small offline lm-evaluation-harness tasks built from the embedded corpus (Python's standard library).

They need no download, so the whole lm-eval path (multiple choice, rolling perplexity and
``generate_until``, at any batch size) runs anywhere, tests included. They check the pipeline and
compare checkpoints of one run; they are not benchmarks (a model trained on the default corpus has
seen this text). Three tasks:

* ``titans_cloze`` (``multiple_choice``, acc / acc_norm): a docstring or comment sentence cut at a
  word, the true ending against three endings of other sentences;
* ``titans_stdlib_ppl`` (``loglikelihood_rolling``): word/byte perplexity and bits per byte over
  the first ``DOC_CHARS`` characters of standard-library files;
* ``titans_complete_line`` (``generate_until``, exact match): three lines of code and the start of
  the next, the model completes the line (greedy, stops at the newline).

The documents are a pure function of the running Python's standard library and ``seed``: the same
Python gives the same tasks. ``python -m titans_pretrain.eval.lm_eval_tasks DIR`` writes them (data
and YAML, with absolute paths) for the ``lm_eval`` command line's ``--include_path``.
"""
from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from titans_pretrain.data.default_corpus import default_corpus_files, stdlib_root

__all__ = ["TASK_NAMES", "build_documents", "write_tasks"]

TASK_NAMES = ("titans_cloze", "titans_stdlib_ppl", "titans_complete_line")
N_CLOZE, N_PPL, N_LINES = 100, 20, 100
DOC_CHARS = 2000
_PROSE = re.compile(r"[A-Za-z][A-Za-z ,'()-]*[a-z]\.?")
_CODE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]* = .+|(return|if|for|while|raise) .+")


def _sources() -> list[tuple[str, list[str]]]:
    root = stdlib_root()
    return [(str(p.relative_to(root)), p.read_text(encoding="utf-8", errors="replace").splitlines())
            for p in default_corpus_files()]


def build_documents(seed: int = 0) -> dict[str, list[dict]]:
    """The three tasks' documents (lists of dicts, the rows of their jsonl files)."""
    rng = random.Random(seed)
    files = _sources()
    prose, code = [], []
    for name, lines in files:
        for i, line in enumerate(lines):
            text = line.strip().lstrip("#").strip()
            if 8 <= len(text.split()) <= 16 and _PROSE.fullmatch(text):
                prose.append(text)
            stripped = line.strip()
            if i >= 3 and 24 <= len(stripped) <= 80 and _CODE.fullmatch(stripped) and len(stripped.split()) >= 4:
                code.append((lines[i - 3:i], line))
    prose = sorted(set(prose))
    rng.shuffle(prose)
    cloze = []
    for k, text in enumerate(prose[:N_CLOZE]):
        words = text.split()
        cut = rng.randint(len(words) // 2, len(words) - 2)
        endings = [" ".join(words[cut:])]
        others = prose[N_CLOZE + 3 * k:N_CLOZE + 3 * k + 3]
        endings += [" ".join(o.split()[len(o.split()) // 2:]) for o in others]
        order = list(range(4))
        rng.shuffle(order)
        cloze.append({"context": " ".join(words[:cut]), "choices": [endings[j] for j in order],
                      "label": order.index(0)})
    ppl_files = rng.sample([f for f in files if sum(map(len, f[1])) >= DOC_CHARS], N_PPL)
    ppl = [{"name": name, "text": "\n".join(lines)[:DOC_CHARS]} for name, lines in ppl_files]
    rng.shuffle(code)
    complete = []
    for before, line in code[:N_LINES]:
        indent = line[:len(line) - len(line.lstrip())]
        words = line.strip().split(" ")
        cut = rng.randint(max(1, len(words) // 3), len(words) - 1)
        complete.append({"context": "\n".join(before) + "\n" + indent + " ".join(words[:cut]),
                         "target": " ".join(words[cut:])})
    return {"titans_cloze": cloze, "titans_stdlib_ppl": ppl, "titans_complete_line": complete}


def _yaml(task: str, data_file: Path) -> str:
    head = (f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {json.dumps(str(data_file))}\ntest_split: test\n")
    if task == "titans_cloze":
        body = ("output_type: multiple_choice\ndoc_to_text: \"{{context}}\"\ndoc_to_choice: \"{{choices}}\"\n"
                "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    elif task == "titans_stdlib_ppl":
        body = ("output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
                "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
                "  - metric: bits_per_byte\n")
    else:
        body = ("output_type: generate_until\ndoc_to_text: \"{{context}}\"\ndoc_to_target: \"{{target}}\"\n"
                "generation_kwargs:\n  until: [\"\\n\"]\n  do_sample: false\n  max_gen_toks: 24\n"
                "filter_list:\n  - name: strip\n    filter:\n      - function: remove_whitespace\n"
                "      - function: take_first\n"
                "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    return head + body + "metadata:\n  version: 1.0\n"


def write_tasks(folder: str | Path, seed: int = 0) -> list[str]:
    """Write each task's ``.jsonl`` and ``.yaml`` into ``folder``; returns the task names."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    for task, docs in build_documents(seed).items():
        data_file = folder / f"{task}.jsonl"
        data_file.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (folder / f"{task}.yaml").write_text(_yaml(task, data_file))
    return list(TASK_NAMES)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="where to write the task files (lm_eval --include_path FOLDER)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    names = write_tasks(args.folder, args.seed)
    print(f"wrote {', '.join(names)} to {Path(args.folder).resolve()}")


if __name__ == "__main__":
    main()
