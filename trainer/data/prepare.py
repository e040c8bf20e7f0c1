"""Tokenise a raw source once, in N processes, into token shards (shards.py) plus a manifest.

The main process reads the source in its fixed order (reading.py), hands batches of texts to
a pool of N tokenising processes, takes the results back in order and cuts the document stream
into parts at the first document boundary past `shard_tokens` tokens. The parts depend only on
the data, the tokenizer and `shard_tokens`, never on N. Memory holds a few batches, never the
corpus. An interrupted run leaves complete parts (each with a record) and maybe temporary
files; run again, it keeps the complete parts of the same job, deletes the rest, skips the
input rows those parts consumed and goes on. The manifest, written last, marks completion.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import deque
from collections.abc import Callable, Iterator

import numpy as np
from filelock import FileLock

from trainer.data.cache import stable_hash
from trainer.data.reading import RawSource, iter_text_batches, resolve_raw_source
from trainer.data.shards import (
    FORMAT,
    FORMAT_VERSION,
    LOCK,
    MANIFEST,
    PartWriter,
    kept_part_records,
    read_manifest,
    token_dtype,
    write_manifest,
)
from trainer.data.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer, encode_documents

BATCH_ROWS = 512
DEFAULT_SHARD_TOKENS = 1 << 28
# A test hook: seconds to sleep before committing each part, so a test can kill a prepare
# at a known point (between parts, with a finished temporary .bin on disk).
PAUSE_ENV = "PERENNIAL_PREPARE_PAUSE_S"


def tokenizer_record(spec: str, tokenizer: ByteTokenizer | HFTokenizer) -> dict:
    return {
        "spec": spec,
        "identity": tokenizer.identity,
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id if tokenizer.add_bos else None,
        "eos_id": tokenizer.eos_id,
    }


def prepare(
    source_spec: str,
    out: str,
    tokenizer_spec: str = "bytes",
    num_proc: int = 1,
    text_column: str = "text",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    say: Callable[[str], None] = lambda message: None,
) -> dict:
    """Prepare `source_spec` into directory `out` (resuming a previous run); the manifest."""
    if num_proc < 1 or shard_tokens < 1:
        raise ValueError(f"--num-proc ({num_proc}) and --shard-tokens must be >= 1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # N processes, one thread each
    tokenizer = build_tokenizer(tokenizer_spec)
    raw = resolve_raw_source(source_spec)
    dtype = token_dtype(tokenizer.vocab_size)
    identity = {
        "source": raw.fingerprint(),
        "text_column": text_column,
        "tokenizer": tokenizer.identity,
        "add_bos": tokenizer.add_bos,
        "dtype": dtype.name,
        "shard_tokens": shard_tokens,
        "version": FORMAT_VERSION,
    }
    job = stable_hash(identity)
    os.makedirs(out, exist_ok=True)
    with FileLock(os.path.join(out, LOCK)):
        if os.path.exists(os.path.join(out, MANIFEST)):
            manifest = read_manifest(out)
            if manifest["job"] != job:
                raise ValueError(
                    f"{out} already holds data prepared from another source, tokenizer or "
                    f"settings ({manifest['source']['spec']}); choose another OUT or delete it"
                )
            say(f"{out} is already prepared ({manifest['tokens']:,} tokens)")
            return manifest
        records = kept_part_records(out, job, dtype.itemsize)
        rows_done = records[-1]["rows_end"] if records else 0
        if records:
            say(f"resuming after {len(records)} complete part(s), {rows_done:,} rows")
        start = time.perf_counter()
        writer = ShardWriter(out, dtype, shard_tokens, job, len(records), rows_done)
        try:
            for tokens, lengths in _tokenized(raw, text_column, tokenizer_spec, num_proc,
                                              dtype, rows_done):
                writer.add(tokens, lengths)
            records += writer.finish()
        finally:
            writer.discard()
        if not records:
            raise ValueError(
                f"{source_spec} holds no documents (column {text_column!r} is empty everywhere)"
            )
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "job": job,
            "source": {"spec": source_spec, "text_column": text_column},
            "tokenizer": tokenizer_record(tokenizer_spec, tokenizer),
            "dtype": dtype.name,
            "shard_tokens": shard_tokens,
            "documents": sum(record["documents"] for record in records),
            "tokens": sum(record["tokens"] for record in records),
            "rows": records[-1]["rows_end"],
            "parts": records,
        }
        write_manifest(out, manifest)
    seconds = time.perf_counter() - start
    say(
        f"prepared {source_spec} -> {out}: {manifest['documents']:,} documents, "
        f"{manifest['tokens']:,} tokens ({dtype.name}) in {len(records)} part(s), "
        f"{seconds:.1f} s"
    )
    return manifest


class ShardWriter:
    """Cuts the ordered document stream into parts of about `shard_tokens` tokens."""

    def __init__(self, directory, dtype, shard_tokens: int, job: str, first_part: int, rows: int):
        self.directory, self.dtype, self.job = directory, dtype, job
        self.shard_tokens = shard_tokens
        self.next_part, self.rows = first_part, rows
        self.part: PartWriter | None = None
        self.records: list[dict] = []

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """One batch: `lengths[i]` tokens of input row i (0 for an empty row)."""
        ends = np.cumsum(lengths)
        row = token = 0
        while row < len(lengths):
            if self.part is None:
                self.part = PartWriter(self.directory, self.next_part, self.dtype)
            room = self.shard_tokens - self.part.num_tokens
            # Rows up to and including the first one that fills the part (or all of them).
            filled = ends[row:] - token
            count = min(int(np.searchsorted(filled, room)) + 1, len(lengths) - row)
            stop = token + int(filled[count - 1])
            taken = lengths[row : row + count]
            self.part.add(tokens[token:stop], taken[taken > 0])
            row, token, self.rows = row + count, stop, self.rows + count
            if self.part.num_tokens >= self.shard_tokens:
                self._commit()

    def finish(self) -> list[dict]:
        if self.part is not None and self.part.num_tokens:
            self._commit()
        return self.records

    def discard(self) -> None:
        if self.part is not None:
            self.part.discard()
            self.part = None

    def _commit(self) -> None:
        if os.environ.get(PAUSE_ENV):
            time.sleep(float(os.environ[PAUSE_ENV]))
        self.records.append(self.part.commit(self.rows, self.job))
        self.part, self.next_part = None, self.next_part + 1


def _tokenized(
    raw: RawSource, column: str, tokenizer_spec: str, num_proc: int, dtype, skip: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    batches = _skip_rows(iter_text_batches(raw, column, BATCH_ROWS), skip)
    if num_proc == 1:
        _init_worker(tokenizer_spec)
        for texts in batches:
            yield _encode(texts, dtype.str)
        return
    # Spawned, not forked: the parent may hold threads (datasets, torch) a fork would break.
    context = multiprocessing.get_context("spawn")
    with context.Pool(num_proc, initializer=_init_worker, initargs=(tokenizer_spec,)) as pool:
        # Hand-written window instead of Pool.imap: imap reads its input ahead without bound,
        # which would hold the whole corpus in memory when reading outpaces tokenising.
        pending: deque = deque()
        for texts in batches:
            pending.append(pool.apply_async(_encode, (texts, dtype.str)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _skip_rows(batches: Iterator[list[str]], rows: int) -> Iterator[list[str]]:
    for texts in batches:
        if rows >= len(texts):
            rows -= len(texts)
            continue
        yield texts[rows:]
        rows = 0


_WORKER: dict = {}


def _init_worker(tokenizer_spec: str) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if _WORKER.get("spec") != tokenizer_spec:
        _WORKER.update(spec=tokenizer_spec, tokenizer=build_tokenizer(tokenizer_spec))


def _encode(texts: list[str], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    return encode_documents(_WORKER["tokenizer"], texts, np.dtype(dtype))
