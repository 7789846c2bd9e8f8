"""Run in a fresh process: load an exported folder with titans_pretrain made unimportable.

Usage: python fresh_load.py HF_DIR INPUTS.pt RESULT.json. INPUTS.pt holds `ids`, `text`, `new_tokens`;
the result holds what the parent test compares with the native model.
"""
import importlib.abc
import json
import sys


class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "titans_pretrain" or name.startswith("titans_pretrain."):
            raise ImportError(f"{name} is blocked: the export must be self-contained")
        return None


sys.meta_path.insert(0, _Block())


def main(folder: str, inputs: str, result: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import titans_pretrain  # noqa: F401
        blocked = False
    except ImportError:
        blocked = True
    data = torch.load(inputs)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        logits = model(data["ids"]).logits
        generated = model.generate(data["ids"], max_new_tokens=data["new_tokens"], do_sample=False)
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    torch.save({"logits": logits, "generated": generated}, result + ".pt")
    loaded = sorted(m for m in sys.modules if m.startswith("titans_pretrain"))
    with open(result, "w") as f:
        json.dump({"blocked": blocked, "loaded": loaded, "class": type(model).__module__,
                   "encoded": tok.encode(data["text"]), "decoded": tok.decode(tok.encode(data["text"])),
                   "eos": tok.eos_token_id, "pad": tok.pad_token_id}, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
