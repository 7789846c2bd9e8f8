"""Where a prepared dataset lives: a local folder or a URL, read through webdataset's `gopen`.

`data.path` forms:

- a local folder, or `file:///abs/folder`;
- `http(s)://host/folder` (curl, as webdataset opens it);
- a shard URL, brace lists allowed: `http://host/ds/train-{00000..00099}.tar`,
  `pipe:aws s3 cp s3://b/ds/train-{00000..00099}.tar -`, `pipe:cat /d/{train-00000,val-00000}.tar`.
  The shard name splits each URL into prefix + name + suffix; every other file of the dataset
  (`manifest.json`, the tokenizer, shards) is read from prefix + file + suffix, so the manifest
  comes from the same place. The listed shards select which of the manifest's shards are used.

Every shard read is checked against the manifest's sha256 (by the caller). With a cache folder,
remote files with a known hash are kept there after a good read and read back from it (re-fetched
when their hash differs); `manifest.json` is always read from the source. An unknown scheme or an unreadable URL is a `LocationError` naming it: never a fallback.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

SCHEMES = ("file", "http", "https", "pipe")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://|^(pipe):")
_SHARD = re.compile(r"[^/\s'\"]+\.tar")
EXAMPLE = "pipe:aws s3 cp s3://bucket/ds/train-{00000..00009}.tar -"


class LocationError(ValueError):
    """A dataset location that cannot be used or read; the message names it and the fix."""


def is_url(spec: str) -> bool:
    return bool(_URL.match(str(spec)))


def _expand(spec: str) -> list[str]:
    import braceexpand

    return list(braceexpand.braceexpand(spec))


_CURL = {6: "host not found", 7: "connection refused", 22: "HTTP error status, e.g. 404",
         28: "timed out", 35: "TLS handshake failed"}


def _reason(url: str, exc: Exception) -> str:
    """A short cause for a failed gopen: curl's or the command's exit status, else the error."""
    status = re.search(r"exit (\d+)", str(exc))
    if status is None:
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    code = int(status.group(1))
    if url.startswith("pipe:"):
        return f"the command exited with status {code}"
    return f"curl exit {code}" + (f": {_CURL[code]}" if code in _CURL else "")


class Location:
    """A dataset's files as `prefix + file + suffix` (a local folder: `folder/ + file`)."""

    def __init__(self, spec: str | Path, cache: str | Path | None = None):
        self.spec = str(spec)
        self.selection: tuple[str, ...] | None = None
        self.cache = None if cache is None else Path(cache)
        self._fetched: dict[str, Path] = {}
        match = _URL.match(self.spec)
        if match is None:  # a local folder
            self.local: Path | None = Path(self.spec).resolve()
            self.prefix, self.suffix = str(self.local) + os.sep, ""
            self.cache = None
            return
        scheme = (match.group(1) or match.group(2)).lower()
        if scheme not in SCHEMES:
            raise LocationError(f"data.path={self.spec}: the scheme {scheme!r} is not supported; use a "
                                f"local folder, file://, http(s):// or pipe:COMMAND (e.g. {EXAMPLE})")
        urls = _expand(self.spec)
        named = [list(_SHARD.finditer(u)) for u in urls]
        if all(named):
            parts = {(u[:m[-1].start()], u[m[-1].end():]) for u, m in zip(urls, named)}
            if len(parts) != 1:
                raise LocationError(f"data.path={self.spec}: the listed shards must differ only in "
                                    f"their file names (found {len(parts)} different places)")
            (self.prefix, self.suffix), = parts
            self.selection = tuple(m[-1].group(0) for m in named)
        elif scheme == "pipe" or len(urls) > 1:
            raise LocationError(f"data.path={self.spec}: a pipe: or brace-listed URL must name the "
                                f"shards (.../NAME.tar), e.g. {EXAMPLE}")
        else:
            self.prefix, self.suffix = self.spec.rstrip("/") + "/", ""
        self.local = None
        if scheme == "file":
            self.local = Path(re.sub(r"^file://", "", self.prefix)).resolve()
            if self.suffix:
                raise LocationError(f"data.path={self.spec}: a file:// URL cannot have text after "
                                    "the shard name")
            self.prefix, self.cache = str(self.local) + os.sep, None

    def __repr__(self) -> str:
        return f"Location({self.spec!r})"

    def url(self, file: str) -> str:
        return self.prefix + file + self.suffix

    def path(self, file: str) -> Path | None:
        """The local path of `file` (None for a remote location)."""
        return None if self.local is None else self.local / file

    def _cached(self, file: str) -> Path | None:
        if self.cache is None:
            return None
        key = hashlib.sha256((self.prefix + "\0" + self.suffix).encode()).hexdigest()[:16]
        return self.cache / key / file

    def read(self, file: str, sha256: str | None = None) -> bytes:
        """The bytes of `file`; `LocationError` naming the URL when it cannot be read."""
        if self.local is not None:
            try:
                return (self.local / file).read_bytes()
            except OSError as exc:
                raise LocationError(f"{self.local / file} cannot be read ({exc.strerror or exc})") from exc
        cached = None if sha256 is None else self._cached(file)
        if cached is not None and cached.is_file():
            data = cached.read_bytes()
            if sha256 is None or hashlib.sha256(data).hexdigest() == sha256:
                return data
        from webdataset import gopen

        url = self.url(file)
        try:
            stream = gopen(url, "rb")
            try:
                data = stream.read()
            finally:
                stream.close()
        except Exception as exc:  # noqa: BLE001 - curl/pipe failures surface as OSError or ValueError
            raise LocationError(f"{url} cannot be read ({_reason(url, exc)}); check that it is "
                                "reachable from this machine and holds the prepared dataset") from exc
        if cached is not None and sha256 is not None and hashlib.sha256(data).hexdigest() == sha256:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(f"{cached.name}.{os.getpid()}.partial")
            tmp.write_bytes(data)
            os.replace(tmp, cached)  # ranks sharing a cache: each writes its own temp, last wins
        return data

    def fetch(self, file: str, sha256: str | None = None) -> Path:
        """A local path holding `file` (the file itself, the cache's copy, or a temporary copy)."""
        if self.local is not None:
            return self.local / file
        if file in self._fetched:
            return self._fetched[file]
        data = self.read(file, sha256)
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise LocationError(f"{self.url(file)} is corrupt: its sha256 differs from manifest.json")
        cached = None if sha256 is None else self._cached(file)
        if cached is not None and cached.is_file():
            return cached
        folder = Path(tempfile.mkdtemp(prefix="titans-data-"))
        (folder / file).write_bytes(data)
        self._fetched[file] = folder / file
        return folder / file
