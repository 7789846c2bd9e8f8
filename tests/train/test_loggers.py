"""metrics.jsonl after a run killed mid-write: the next logger never appends onto the torn line."""
import json

import pytest

from titans_pretrain.train.loggers import JsonlLogger, drop_torn_tail


def test_jsonl_logger_starts_on_a_line_of_its_own(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo')
    logger = JsonlLogger(path)
    logger.log({"step": 2, "loss": 1.5})
    logger.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"step": 1}, {"step": 2, "loss": 1.5}]
    assert f"dropped the torn last line of {path} (15 bytes" in capsys.readouterr().out


@pytest.mark.parametrize("text, kept", [(b'{"a": 1}\n{"b": 22222222', b'{"a": 1}\n'),  # torn, over blocks
                                        (b'{"a": 1}\n', b'{"a": 1}\n'),  # intact: untouched
                                        (b'{"a": 1', b''),  # nothing but a torn line
                                        (b'', b'')])
def test_drop_torn_tail_keeps_whole_lines_only(tmp_path, text, kept):
    path = tmp_path / "m.jsonl"
    path.write_bytes(text)
    assert drop_torn_tail(path, block=3) == len(text) - len(kept)
    assert path.read_bytes() == kept
