"""Where a training sample came from: its source file, document and first token.

`prepare` names every sample `{index:09d}_d{document:09d}_t{token:07d}` (its index in the split,
the corpus-wide number of the non-empty document holding its first token, and that token's
position in the document); `manifest.totals.sources` lists the files in corpus order with their
document counts, which turns the document number into (file, n-th non-empty document of the file).
A sample of `seq_len + 1` tokens can run on into the documents that follow.
"""
from __future__ import annotations

import io
import re
import tarfile
from bisect import bisect_right
from itertools import accumulate

from titans_pretrain.data.manifest import Manifest
from titans_pretrain.data.shards import MEMBER_SUFFIX

_KEY = re.compile(r"^(\d{9})_d(\d{9})_t(\d{7})$")


def parse_key(key: str) -> tuple[int, int, int] | None:
    """(index, document, token) of a sample key; None for a bare-index key (older datasets)."""
    match = _KEY.match(key)
    return None if match is None else tuple(int(g) for g in match.groups())


def source_of(manifest: Manifest, document: int) -> tuple[str, int]:
    """(file path, n-th non-empty document of that file, from 0) of corpus document `document`."""
    counts = [s["documents"] for s in manifest.totals.sources]
    ends = list(accumulate(counts))
    k = bisect_right(ends, document)
    if k >= len(counts):
        raise ValueError(f"document {document} is beyond the {ends[-1] if ends else 0} documents "
                         f"that {manifest.path} records")
    return manifest.totals.sources[k]["path"], document - (ends[k] - counts[k])


def trace(manifest: Manifest, split: str, index: int) -> dict:
    """The provenance of sample `index` of `split` (the loader's sample id within the split)."""
    start = 0
    for shard in manifest.shards(split):
        if index < start + shard.samples:
            break
        start += shard.samples
    else:
        raise IndexError(f"split {split!r} has {start} samples; no sample {index}")
    data = manifest.location.read(shard.file, shard.sha256)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        names = [m.name[:-len(MEMBER_SUFFIX)] for m in tar if m.name.endswith(MEMBER_SUFFIX)]
    key = names[index - start]
    parsed = parse_key(key)
    if parsed is None:
        raise ValueError(f"{manifest.location.url(shard.file)} has bare sample keys ({key}): it was "
                         "prepared before samples recorded their documents; re-run `prepare`")
    _, document, token = parsed
    path, nth = source_of(manifest, document)
    return {"split": split, "index": index, "shard": shard.file, "key": key, "document": document,
            "file": path, "document_in_file": nth, "token": token}
