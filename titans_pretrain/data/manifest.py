"""`manifest.json`: the description of a prepared dataset, written last by `prepare`.

Its presence means the dataset is complete. It records the tokenizer (file, sha256, vocab size,
special ids), the sample length, every shard per split with its sample count and sha256, and
totals (documents, tokens, dropped tokens, sources), plus the cache key `prepare` reuses it by.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class ShardInfo:
    file: str
    samples: int
    bytes: int
    sha256: str


@dataclass
class SplitInfo:
    shards: list[ShardInfo]

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)


@dataclass
class Totals:
    files: int = 0
    documents: int = 0
    empty_documents: int = 0
    bytes: int = 0
    replaced_bytes: int = 0
    tokens: int = 0  # document tokens plus one EOS per document
    dropped_tokens: int = 0  # the final remainder of each split, shorter than one sample
    sources: list[dict] = field(default_factory=list)


@dataclass
class Manifest:
    format_version: int
    tokenizer_file: str
    tokenizer_sha256: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    seq_len: int
    dtype: str
    splits: dict[str, SplitInfo]
    totals: Totals
    params: dict
    cache_key: str
    root: Path = field(default=Path("."), compare=False)
    location: object = field(default=None, compare=False, repr=False)  # a data.location.Location

    def __post_init__(self):
        if self.location is None:
            from titans_pretrain.data.location import Location

            self.location = Location(self.root)

    @property
    def sample_len(self) -> int:
        """Tokens per stored sample: `seq_len + 1`, so inputs and shifted labels both fit."""
        return self.seq_len + 1

    @property
    def tokenizer_path(self) -> Path:
        """A local path of the tokenizer (a remote dataset's is fetched, hash-checked, on first use)."""
        if self.location.local is None:
            return self.location.fetch(self.tokenizer_file, self.tokenizer_sha256 or None)
        return self.root / self.tokenizer_file

    @property
    def path(self) -> Path | str:
        """Where `manifest.json` is: a path, or the URL of a remote dataset."""
        if self.location.local is None:
            return self.location.url(MANIFEST_NAME)
        return self.root / MANIFEST_NAME

    def shards(self, split: str) -> list[ShardInfo]:
        if split not in self.splits:
            raise ValueError(f"split {split!r} is not in {self.path} (splits: {sorted(self.splits)})")
        return self.splits[split].shards

    def fingerprint(self) -> str:
        """Identifies the shard layout; a resumed loader checks it to detect a changed dataset."""
        layout = {name: [(s.file, s.samples, s.sha256) for s in split.shards]
                  for name, split in sorted(self.splits.items())}
        return hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("root")
        data.pop("location")
        data["sample_len"] = self.sample_len
        for name, split in self.splits.items():
            data["splits"][name]["samples"] = split.samples
        return data


def save_manifest(manifest: Manifest, folder: Path) -> Path:
    """Write atomically (temporary name, fsync, rename): a manifest is never half-written."""
    path = folder / MANIFEST_NAME
    tmp = folder / (MANIFEST_NAME + ".partial")
    with open(tmp, "w") as f:
        json.dump(manifest.to_json(), f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_manifest(path: str | Path, *, cache: str | Path | None = None) -> Manifest:
    """Load `manifest.json` from a dataset folder (or the file itself), or from a URL location
    (`data.location`: file://, http(s)://, pipe:); `cache` keeps remote shards locally."""
    from titans_pretrain.data.location import Location, is_url

    if is_url(str(path)):
        location = Location(str(path), cache=cache)
        return _with_selection(parse_manifest(location.read(MANIFEST_NAME).decode("utf-8", "replace"),
                                              location.url(MANIFEST_NAME), location), location)
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no dataset manifest at {path}: run `titans-pretrain prepare` "
                                f"first (a folder without manifest.json is an incomplete dataset)")
    return parse_manifest(path.read_text(), str(path), Location(path.parent))


def _with_selection(manifest: Manifest, location) -> Manifest:
    """Keep only the shards a brace-listed location names; a name not in the manifest is an error."""
    if location.selection is None:
        return manifest
    known = {s.file for split in manifest.splits.values() for s in split.shards}
    unknown = [name for name in location.selection if name not in known]
    if unknown:
        raise ValueError(f"data.path={location.spec} lists {', '.join(unknown[:3])}, which "
                         f"{location.url(MANIFEST_NAME)} does not have; list shards of this dataset")
    chosen = set(location.selection)
    manifest.splits = {name: SplitInfo(shards=[s for s in split.shards if s.file in chosen])
                       for name, split in manifest.splits.items()}
    manifest.splits = {name: split for name, split in manifest.splits.items() if split.shards}
    return manifest


def parse_manifest(text: str, where: str, location) -> Manifest:
    """A `Manifest` from the text of `manifest.json` read at `where`; its files are at `location`."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where} is not valid JSON ({exc}); re-run `prepare`") from exc
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{where} has format_version {version!r}; this code reads version "
                         f"{FORMAT_VERSION}: re-run `prepare` with this version")
    splits = {name: SplitInfo(shards=[ShardInfo(**s) for s in split["shards"]])
              for name, split in data["splits"].items()}
    return Manifest(
        format_version=version,
        tokenizer_file=data["tokenizer_file"], tokenizer_sha256=data["tokenizer_sha256"],
        vocab_size=data["vocab_size"], bos_id=data["bos_id"], eos_id=data["eos_id"],
        pad_id=data["pad_id"], seq_len=data["seq_len"], dtype=data["dtype"], splits=splits,
        totals=Totals(**data["totals"]), params=data["params"], cache_key=data["cache_key"],
        root=location.local if location.local is not None else Path("."), location=location,
    )


def check_compatible(manifest: Manifest, *, vocab_size: int, seq_len: int) -> None:
    """Raise `ValueError` when a model with this vocab size and context cannot train on `manifest`.

    A model vocab larger than the tokenizer's is allowed (padded embeddings are common); smaller
    would index out of the embedding table.
    """
    if vocab_size < manifest.vocab_size:
        raise ValueError(f"model vocab_size={vocab_size} is smaller than the dataset tokenizer's "
                         f"vocab size {manifest.vocab_size} ({manifest.tokenizer_path}): set "
                         f"model.vocab_size >= {manifest.vocab_size} or re-run `prepare` with "
                         f"--vocab-size {vocab_size}")
    if seq_len != manifest.seq_len:
        raise ValueError(f"model seq_len={seq_len} differs from the dataset's seq_len="
                         f"{manifest.seq_len} ({manifest.path}): set the model/data seq_len to "
                         f"{manifest.seq_len} or re-run `prepare` with --seq-len {seq_len}")
