"""Read a raw source as a stream of text batches with Hugging Face `datasets`, never the hub.

A source is one of:
- a file or a directory of files: `.jsonl/.json/.txt/.parquet`, each possibly `.gz` or `.zst`
  compressed (read as a streaming `IterableDataset`: memory does not grow with the file);
- a `Dataset.save_to_disk` directory (or a `DatasetDict`'s, whose `train` split is read);
- `hf:NAME` or `hf:NAME:CONFIG`, a dataset already in the local Hugging Face datasets cache
  (`HF_DATASETS_CACHE`), loaded offline.

Rows come in a fixed order (files sorted by path), so a stream can be re-read to resume.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before `datasets` is imported: no network
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HF_PREFIX = "hf:"
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")
COMPRESSED_SUFFIXES = ("", ".gz", ".zst")
ACCEPTED_FILE_SUFFIXES = tuple(s + c for s in DATA_FILE_SUFFIXES for c in COMPRESSED_SUFFIXES)
BUILDER_BY_SUFFIX = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}
SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json")


class SourceError(ValueError):
    """A source that cannot be read as asked; the message names it."""


@dataclass(frozen=True)
class RawSource:
    """Where a source's text comes from: `kind` is "files", "saved" or "hf"."""

    spec: str
    kind: str
    files: tuple[str, ...] = ()

    def fingerprint(self) -> list:
        """Changes whenever the content may have: every file's path, size and mtime."""
        if self.kind == "hf":
            return [self.spec]
        return [(file, os.path.getsize(file), os.stat(file).st_mtime_ns) for file in self.files]


def resolve_raw_source(spec: str) -> RawSource:
    """Classify `spec` and list its files. Raises ValueError naming what is wrong."""
    if spec.startswith(HF_PREFIX):
        if not spec[len(HF_PREFIX) :]:
            raise ValueError(f"{spec}: name a dataset, e.g. hf:owner/name or hf:owner/name:config")
        return RawSource(spec, "hf")
    path = os.path.abspath(os.path.expanduser(spec))
    if not os.path.exists(path):
        raise ValueError(f"{spec} does not exist")
    if os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, m)) for m in SAVED_DATASET_MARKERS
    ):
        return RawSource(spec, "saved", tuple(_walk(path, (".arrow", ".json"))))
    files = [path] if os.path.isfile(path) else _walk(path, ACCEPTED_FILE_SUFFIXES)
    if not files:
        raise ValueError(f"no {DATA_FILE_SUFFIXES} files (or .gz/.zst of them) under {spec}")
    builders = {builder_for(file) for file in files}
    if len(builders) > 1:
        raise ValueError(f"{spec} mixes file formats {sorted(builders)}; use one source per format")
    return RawSource(spec, "files", tuple(files))


def builder_for(file: str) -> str:
    """The `datasets` packaged builder reading `file` (compression is handled by datasets)."""
    stem = file[: -len(".gz")] if file.endswith(".gz") else file
    stem = stem[: -len(".zst")] if stem.endswith(".zst") else stem
    for suffix, builder in BUILDER_BY_SUFFIX.items():
        if stem.endswith(suffix):
            return builder
    raise ValueError(f"{file}: unsupported file type; expected one of {ACCEPTED_FILE_SUFFIXES}")


def iter_text_batches(
    source: RawSource, text_column: str, batch_size: int = 1000
) -> Iterator[list[str]]:
    """The source's documents in order, `batch_size` at a time (None becomes "")."""
    dataset = _open(source)
    column = "text" if source.kind == "files" and builder_for(source.files[0]) == "text" else (
        text_column
    )
    try:
        for index, batch in enumerate(dataset.iter(batch_size=batch_size)):
            if index == 0 and column not in batch:
                raise SourceError(
                    f"{source.spec}: no column {column!r} (columns: {sorted(batch)}); "
                    f"set its text_column"
                )
            yield [text or "" for text in batch[column]]
    except SourceError:
        raise
    except Exception as error:  # datasets/pyarrow/gzip/zstd all raise their own kinds
        raise SourceError(f"cannot read {source.spec}: {type(error).__name__}: {error}") from error


def _open(source: RawSource):
    import datasets

    try:
        if source.kind == "saved":
            loaded = datasets.load_from_disk(os.path.expanduser(source.spec))
            if isinstance(loaded, datasets.DatasetDict):
                if "train" not in loaded:
                    raise SourceError(
                        f"{source.spec}: a saved DatasetDict without a 'train' split "
                        f"(splits: {sorted(loaded)})"
                    )
                loaded = loaded["train"]
            return loaded
        if source.kind == "hf":
            name, _, config = source.spec[len(HF_PREFIX) :].partition(":")
            return datasets.load_dataset(name, config or None, split="train", streaming=True)
        builder = builder_for(source.files[0])
        options = {"sample_by": "paragraph"} if builder == "text" else {}  # paragraphs = docs
        return datasets.load_dataset(
            builder, data_files=list(source.files), split="train", streaming=True, **options
        )
    except SourceError:
        raise
    except Exception as error:
        raise SourceError(f"cannot read {source.spec}: {type(error).__name__}: {error}") from error


def _walk(root: str, suffixes: tuple[str, ...]) -> list[str]:
    return sorted(
        os.path.join(directory, name)
        for directory, _, names in os.walk(root)
        for name in names
        if name.endswith(suffixes) and not name.startswith(".")
    )
