"""The bundler refuses what would break a self-contained export, and its output compiles."""
from __future__ import annotations

import pytest

from titans_pretrain.hf import bundle


def test_bundled_source_is_self_contained():
    source = bundle.modeling_source()
    compile(source, "modeling_titans.py", "exec")
    assert "from .configuration_titans import TitansHFConfig" in source
    assert "from titans_pretrain" not in source and "import titans_pretrain" not in source
    assert source.count("from __future__ import annotations") == 1


def test_unbundled_import_is_an_error_naming_the_module():
    src = "from __future__ import annotations\nfrom titans_pretrain.train.optim import build_optimizer\n"
    with pytest.raises(bundle.BundleError, match="titans_pretrain.train.optim"):
        bundle._rewrite("fake", src, set(bundle.BUNDLED_MODULES))
    with pytest.raises(bundle.BundleError, match="import titans_pretrain"):
        bundle._rewrite("fake", "import titans_pretrain.models\n", set(bundle.BUNDLED_MODULES))


def test_nested_and_type_checking_imports_become_pass():
    src = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from titans_pretrain.models.titans import (\n"
           "        TitansLM,\n    )\ndef f():\n    from titans_pretrain.models.generation import generate\n"
           "    return generate\n")
    out = bundle._rewrite("fake", src, set(bundle.BUNDLED_MODULES))
    compile(out, "x.py", "exec")
    assert "titans_pretrain.models.titans: bundled above" in out and "TitansLM," not in out


def test_top_level_name_clash_is_an_error():
    with pytest.raises(bundle.BundleError, match="both define"):
        bundle.modeling_source(modules=("titans_pretrain.models.norms", "titans_pretrain.models.norms"))
