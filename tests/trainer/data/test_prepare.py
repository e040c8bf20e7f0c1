"""`prepare`: token shards independent of the process count, source formats, bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from trainer.data import DataConfig, SourceConfig, build_data
from trainer.data.prepare import prepare
from trainer.data.shards import TokenShards, verify_shards

from .conftest import documents, write_jsonl

BOS, EOS = 256, 257


def varied_documents(count: int) -> list[str]:
    """Documents of varied lengths, some empty (no document), some non-ASCII."""
    return ["" if i % 17 == 5 else f"doc {i} é " + "xyz " * (i % 23) for i in range(count)]


def framed_tokens(texts: list[str]) -> list[int]:
    return [t for text in texts if text for t in [BOS, *text.encode(), EOS]]


def directory_bytes(directory: Path) -> dict[str, bytes]:
    files = sorted(directory.iterdir())
    return {p.name: p.read_bytes() for p in files if p.name != ".prepare.lock"}


def test_one_and_two_processes_give_identical_shards(tmp_path):
    texts = varied_documents(1500)
    source = write_jsonl(tmp_path / "docs.jsonl", texts)
    one = prepare(source, str(tmp_path / "one"), "bytes", num_proc=1, shard_tokens=9000)
    two = prepare(source, str(tmp_path / "two"), "bytes", num_proc=2, shard_tokens=9000)
    assert one == two and len(one["parts"]) > 3
    assert directory_bytes(tmp_path / "one") == directory_bytes(tmp_path / "two")
    assert one["documents"] == sum(1 for text in texts if text) and one["rows"] == len(texts)
    shards = TokenShards(str(tmp_path / "two"))
    assert shards.dtype == np.dtype("<u2") and one["tokenizer"]["bos_id"] == BOS
    assert shards.read(0, shards.num_tokens).tolist() == framed_tokens(texts)
    ends = np.concatenate([shards.document_ends(r["index"]) + shards.starts[r["index"]]
                           for r in one["parts"]])
    assert ends[-1] == shards.num_tokens and len(ends) == one["documents"]
    assert all(r["tokens"] >= 9000 for r in one["parts"][:-1])  # cut at a document boundary
    assert verify_shards(str(tmp_path / "two")) == []
    (tmp_path / "two" / "part-00001.bin").write_bytes(b"\0" * one["parts"][1]["tokens"] * 2)
    assert verify_shards(str(tmp_path / "two")) == [
        f"{tmp_path / 'two' / 'part-00001.bin'}: checksum mismatch"
    ]


def data_cfg(tmp_path: Path, path: str, text_column: str = "text") -> DataConfig:
    return DataConfig(
        sources=[SourceConfig("src", path, text_column=text_column)],
        seq_len=16,
        eval_fraction=0.05,
        eval_batches=2,
        cache_dir=str(tmp_path / "cache"),
        record_sample_ids=True,
    )


def steps(data, count: int) -> list[tuple[list[str], list[list[int]]]]:
    out = []
    for _ in range(count):
        batches = data.next_step_batches(0, 1)
        out.append((data.last_sample_ids, [x.tolist() for inputs, _ in batches for x in inputs]))
    return out


def test_training_from_prepared_shards_sees_the_raw_sources_samples(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", varied_documents(800))
    prepare(source, str(tmp_path / "prepared"), "bytes", num_proc=2, shard_tokens=3000)
    raw = build_data(data_cfg(tmp_path, source), 3, 8, 4)
    prepared = build_data(data_cfg(tmp_path, str(tmp_path / "prepared")), 3, 8, 4)
    assert steps(prepared, 12) == steps(raw, 12)
    assert prepared.eval_batches("src", 0, 1)[0][0].tolist() == raw.eval_batches("src", 0, 1)[0][
        0
    ].tolist()
    assert prepared.sources[0].directory == str(tmp_path / "prepared")


def test_compressed_saved_and_parquet_sources_read_like_jsonl(tmp_path):
    import datasets

    texts = varied_documents(300)
    plain = write_jsonl(tmp_path / "plain.jsonl", texts)
    lines = Path(plain).read_bytes()
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts})}).save_to_disk(
        str(tmp_path / "saved_dict")
    )
    pq.write_table(pa.table({"text": texts}), tmp_path / "c.parquet")
    expected = framed_tokens(texts)
    for name in ("gz", "b.jsonl.zst", "saved", "saved_dict", "c.parquet"):
        manifest = prepare(str(tmp_path / name), str(tmp_path / f"out-{name}"), "bytes")
        shards = TokenShards(str(tmp_path / f"out-{name}"))
        assert shards.read(0, shards.num_tokens).tolist() == expected, name
        assert manifest["rows"] == len(texts)
    data = build_data(data_cfg(tmp_path, str(tmp_path / "gz")), 0, 4, 4)
    assert data.sources[0].train[0].tolist()[:5] == expected[:5]


def cache_hub_dataset(cache: Path, repo: str, texts: list[str]) -> None:
    """What an earlier online `load_dataset(repo)` leaves in the datasets cache: the builder's
    Arrow files under <cache>/<owner>___<name>/<config>/<version>/<hash>/."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.json.json import Json, JsonConfig

    files = DataFilesDict.from_local_or_remote({"train": [write_jsonl(cache / "src.jsonl", texts)]})

    class HubJson(Json):
        BUILDER_CONFIGS = [JsonConfig(name="default", data_files=files)]

    owner, name = repo.split("/")
    HubJson(cache_dir=str(cache), dataset_name=name, config_name="default",
            hash="0" * 16).download_and_prepare()
    (cache / name).rename(cache / f"{owner}___{name}")


def test_dataset_in_the_local_hf_cache_by_name(tmp_path, monkeypatch):
    import datasets

    texts = varied_documents(200)
    cache_hub_dataset(tmp_path / "hf", "perennial/tiny", texts)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    prepare("hf:perennial/tiny", str(tmp_path / "out"), "bytes")
    shards = TokenShards(str(tmp_path / "out"))
    assert shards.read(0, shards.num_tokens).tolist() == framed_tokens(texts)
    data = build_data(data_cfg(tmp_path, "hf:perennial/tiny"), 0, 4, 4)
    packed = data.sources[0]
    assert len(packed.train) + len(packed.eval) == shards.num_tokens // 17
    with pytest.raises(ValueError, match="hf:perennial/absent"):
        prepare("hf:perennial/absent", str(tmp_path / "absent"), "bytes")


def test_bad_input_names_the_problem(tmp_path):
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", ""])
    with pytest.raises(ValueError, match=r"empty\.jsonl holds no documents"):
        prepare(empty, str(tmp_path / "o1"), "bytes")
    docs = write_jsonl(tmp_path / "docs.jsonl", documents("d", 50))
    with pytest.raises(ValueError, match=r"docs\.jsonl: no column 'body'"):
        prepare(docs, str(tmp_path / "o2"), "bytes", text_column="body")
    (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"cannot read .*broken\.jsonl\.gz"):
        prepare(str(tmp_path / "broken.jsonl.gz"), str(tmp_path / "o3"), "bytes")
    with pytest.raises(ValueError, match=r"has 258 tokens, more than model.vocab_size \(100\)"):
        build_data(data_cfg(tmp_path, docs), 0, 4, 4, model_vocab_size=100)
    with pytest.raises(ValueError, match="'src'.*no column 'body'"):
        build_data(data_cfg(tmp_path, docs, text_column="body"), 0, 4, 4)
    for path in (tmp_path / "o1", tmp_path / "o2", tmp_path / "o3"):
        assert not [p for p in path.iterdir() if p.name != ".prepare.lock"]


def test_a_manifest_for_another_tokenizer_is_refused(tmp_path, hf_tokenizer_dir):
    docs = write_jsonl(tmp_path / "docs.jsonl", documents("the quick brown fox", 80))
    prepare(docs, str(tmp_path / "bpe"), hf_tokenizer_dir)
    manifest = json.loads((tmp_path / "bpe" / "manifest.json").read_text())
    assert manifest["tokenizer"]["vocab_size"] == 300
    with pytest.raises(ValueError, match=r"'src': .*bpe was prepared with tokenizer .*tokenizer "
                                         r".*but data.tokenizer is bytes"):
        build_data(data_cfg(tmp_path, str(tmp_path / "bpe")), 0, 4, 4)
    with pytest.raises(ValueError, match="already holds data prepared from another"):
        prepare(docs, str(tmp_path / "bpe"), "bytes")
