"""Tokenizers: byte-level (built in) or a local Hugging Face tokenizer directory.

Both expose `vocab_size`, `bos_id`, `eos_id`, `add_bos`, `encode`, `encode_batch`, `decode` and
`identity` (a string that changes whenever the token ids would, used to key the token caches).
`encode_documents` frames documents as training sees them: BOS (where the tokenizer defines one
apart from EOS), the text's tokens, EOS.
"""

from __future__ import annotations

import hashlib
import os
from typing import Protocol

import numpy as np

MAX_HASHED_FILE_BYTES = 64 << 20


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int
    add_bos: bool
    identity: str

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0-255; BOS is 256 and EOS 257."""

    bos_id = 256
    eos_id = 257
    add_bos = True
    identity = "bytes-v1"

    @property
    def vocab_size(self) -> int:
        return 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8) for text in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local directory (never from the hub)."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.path = os.path.abspath(os.path.expanduser(path))
        try:
            self.hf = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"data.tokenizer: cannot load a tokenizer from {path}: {error}"
            ) from error
        if self.hf.eos_token_id is None:
            raise ValueError(f"data.tokenizer: the tokenizer in {path} has no EOS token")
        self.eos_id: int = self.hf.eos_token_id
        self.bos_id: int = self.hf.bos_token_id if self.hf.bos_token_id is not None else self.eos_id
        # GPT-2 style tokenizers have one <|endoftext|> for both: documents get it once.
        self.add_bos = self.bos_id != self.eos_id
        self.identity = f"hf-{_directory_digest(self.path)}"

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        ids = self.hf(texts, add_special_tokens=False)["input_ids"]
        return [np.asarray(row, dtype=np.int64) for row in ids]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids)


def encode_documents(
    tokenizer: ByteTokenizer | HFTokenizer, texts: list[str], dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens of all documents concatenated, each framed by BOS/EOS; tokens per document).
    An empty text is no document: its length is 0 and it adds no token."""
    head = [tokenizer.bos_id] if tokenizer.add_bos else []
    pieces, lengths = [], np.zeros(len(texts), dtype=np.int64)
    for i, ids in enumerate(tokenizer.encode_batch(texts)):
        if len(ids):
            pieces += [head, ids, [tokenizer.eos_id]]
            lengths[i] = len(ids) + len(head) + 1
    tokens = np.concatenate(pieces).astype(dtype) if pieces else np.zeros(0, dtype)
    return tokens, lengths


def build_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """`"bytes"` or the path of a local Hugging Face tokenizer directory."""
    if spec == "bytes":
        return ByteTokenizer()
    return HFTokenizer(spec)


def _directory_digest(path: str) -> str:
    """Digest of the names and contents of the tokenizer files (sizes only for huge files)."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        digest.update(name.encode())
        size = os.path.getsize(file)
        if size > MAX_HASHED_FILE_BYTES:  # model weights sharing the directory
            digest.update(str(size).encode())
            continue
        with open(file, "rb") as handle:
            digest.update(handle.read())
    return digest.hexdigest()[:16]
