"""Token shards on disk: what `perennial data prepare` writes and training memory-maps.

    OUT/part-00000.bin    the tokens of whole documents, raw little-endian `dtype` (Megatron's
                          .bin, OLMo-core's numpy token files: np.memmap reads them as they are)
    OUT/part-00000.idx    raw little-endian int64: the end offset of each document in the .bin
    OUT/part-00000.json   the part's record (counts, input rows consumed, sha256 of both files)
    OUT/manifest.json     written last: tokenizer identity, counts, every part's record

Every file is written under a temporary name, fsynced and renamed; a part's record follows its
data files and the manifest follows every part, so a directory without manifest.json is never
read as complete, and the records say which parts an interrupted run may keep.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np

from trainer.data.cache import publish, write_json_atomic

FORMAT = "perennial-token-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".prepare.lock"
# Parts and the temporary files of parts and of the manifest.
PART_FILE = re.compile(r"^(\.?part-\d{5}\.(bin|idx|json)|\.manifest\.json)(\..*)?$")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding every token id: uint16 up to 65,536 tokens."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def part_name(index: int, kind: str) -> str:
    return f"part-{index:05d}.{kind}"


class PartWriter:
    """One part being written: tokens stream to a temporary .bin, document ends are kept."""

    def __init__(self, directory: str, index: int, dtype: np.dtype):
        self.directory, self.index, self.dtype = directory, index, dtype
        self.tmp_bin = os.path.join(directory, f".{part_name(index, 'bin')}.{os.getpid()}.tmp")
        self.handle = open(self.tmp_bin, "wb")
        self.digest = hashlib.sha256()
        self.ends: list[np.ndarray] = []
        self.num_tokens = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append whole documents: `tokens` concatenated, `lengths` > 0 each."""
        data = np.ascontiguousarray(tokens, dtype=self.dtype.newbyteorder("<")).tobytes()
        self.handle.write(data)
        self.digest.update(data)
        self.ends.append(self.num_tokens + np.cumsum(lengths, dtype=np.int64))
        self.num_tokens += len(tokens)

    def commit(self, rows_end: int, job: str) -> dict:
        """Publish .bin and .idx, then the record naming both; returns the record."""
        self.handle.close()
        ends = np.concatenate(self.ends).astype("<i8").tobytes()
        tmp_idx = os.path.join(self.directory, f".{part_name(self.index, 'idx')}.tmp")
        with open(tmp_idx, "wb") as handle:
            handle.write(ends)
        publish(self.tmp_bin, os.path.join(self.directory, part_name(self.index, "bin")))
        publish(tmp_idx, os.path.join(self.directory, part_name(self.index, "idx")))
        record = {
            "index": self.index,
            "job": job,
            "tokens": self.num_tokens,
            "documents": len(ends) // 8,
            "rows_end": rows_end,
            "sha256_bin": self.digest.hexdigest(),
            "sha256_idx": hashlib.sha256(ends).hexdigest(),
        }
        write_json_atomic(os.path.join(self.directory, part_name(self.index, "json")), record)
        return record

    def discard(self) -> None:
        self.handle.close()
        if os.path.exists(self.tmp_bin):
            os.remove(self.tmp_bin)


def kept_part_records(directory: str, job: str, itemsize: int) -> list[dict]:
    """The leading parts a previous run of the same job completed, in order; deletes every
    other part file (later parts, temporary files) so that nothing half-written stays."""
    records = []
    while True:
        path = os.path.join(directory, part_name(len(records), "json"))
        try:
            with open(path, encoding="utf-8") as handle:
                record = json.load(handle)
        except (OSError, ValueError):
            break
        if record.get("job") != job or not _part_sizes_match(directory, record, itemsize):
            break
        records.append(record)
    keep = {part_name(r["index"], kind) for r in records for kind in ("bin", "idx", "json")}
    for name in os.listdir(directory):
        if PART_FILE.match(name) and name not in keep:
            os.remove(os.path.join(directory, name))
    return records


def _part_sizes_match(directory: str, record: dict, itemsize: int) -> bool:
    expected = {"bin": record["tokens"] * itemsize, "idx": record["documents"] * 8}
    for kind, size in expected.items():
        path = os.path.join(directory, part_name(record["index"], kind))
        if not os.path.isfile(path) or os.path.getsize(path) != size:
            return False
    return True


def write_manifest(directory: str, manifest: dict) -> None:
    write_json_atomic(os.path.join(directory, MANIFEST), manifest)


def read_manifest(directory: str) -> dict:
    """The manifest of a complete prepare; ValueError naming the directory otherwise."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        raise ValueError(
            f"{directory} is an incomplete `perennial data prepare` output (no {MANIFEST}); "
            f"run the same prepare command again to finish it"
        )
    with open(path, encoding="utf-8") as handle:
        manifest = json.load(handle)
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} manifest")
    return manifest


def is_prepared_dir(path: str) -> bool:
    """A directory `perennial data prepare` wrote to, complete or not."""
    if not os.path.isdir(path):
        return False
    return any(name in (MANIFEST, LOCK) or PART_FILE.match(name) for name in os.listdir(path))


class TokenShards:
    """A prepared directory's tokens as one lazily memory-mapped stream (parts in order)."""

    def __init__(self, directory: str):
        self.directory = directory
        self.manifest = read_manifest(directory)
        self.dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        self.parts = self.manifest["parts"]
        for record in self.parts:
            if not _part_sizes_match(directory, record, self.dtype.itemsize):
                raise ValueError(
                    f"{directory}: {part_name(record['index'], 'bin')} or its .idx is missing "
                    f"or has the wrong size; prepare the data again"
                )
        sizes = [record["tokens"] for record in self.parts]
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self._maps: dict[int, np.memmap] = {}

    @property
    def num_tokens(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the whole stream, copied out of the memory maps."""
        assert 0 <= start <= stop <= self.num_tokens, (start, stop, self.num_tokens)
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces = []
        while start < stop:
            local = start - int(self.starts[first])
            take = min(stop, int(self.starts[first + 1])) - start
            pieces.append(self._map(first)[local : local + take])
            start += take
            first += 1
        if len(pieces) == 1:
            return np.array(pieces[0])
        return np.concatenate(pieces) if pieces else np.zeros(0, self.dtype)

    def _map(self, index: int) -> np.memmap:
        if index not in self._maps:  # opened on first use: a file descriptor per part
            path = os.path.join(self.directory, part_name(index, "bin"))
            self._maps[index] = np.memmap(path, dtype=self.dtype, mode="r")
        return self._maps[index]

    def document_ends(self, index: int) -> np.ndarray:
        path = os.path.join(self.directory, part_name(index, "idx"))
        return np.memmap(path, dtype="<i8", mode="r")


def verify_shards(directory: str) -> list[str]:
    """Problems found by re-hashing every part against the manifest (empty: intact)."""
    manifest = read_manifest(directory)
    problems = []
    for record in manifest["parts"]:
        for kind in ("bin", "idx"):
            path = os.path.join(directory, part_name(record["index"], kind))
            digest = hashlib.sha256()
            try:
                with open(path, "rb") as handle:
                    for block in iter(lambda h=handle: h.read(1 << 24), b""):
                        digest.update(block)
            except OSError as error:
                problems.append(f"{path}: {error.strerror}")
                continue
            if digest.hexdigest() != record[f"sha256_{kind}"]:
                problems.append(f"{path}: checksum mismatch")
    return problems
