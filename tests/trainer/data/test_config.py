"""`DataConfig.validate` names the offending key and builds nothing."""

from __future__ import annotations

import dataclasses
import os

import pytest
from omegaconf import OmegaConf

from trainer.data.config import DataConfig, SourceConfig


def cfg_with(**changes) -> DataConfig:
    return dataclasses.replace(DataConfig(cache_dir="/nonexistent/never/created"), **changes)


def test_default_is_valid_prose_and_builds_nothing():
    cfg = DataConfig(cache_dir="/nonexistent/never/created")
    cfg.validate()
    assert [(s.name, s.path, s.weight) for s in cfg.sources] == [("prose", "stdlib:prose", 1.0)]
    assert not os.path.exists("/nonexistent/never/created")


def test_works_as_omegaconf_structured_config():
    cfg = OmegaConf.structured(DataConfig)
    merged = OmegaConf.merge(
        cfg, {"seq_len": 64, "sources": [{"name": "c", "path": "stdlib:code"}]}
    )
    data_cfg = OmegaConf.to_object(merged)
    assert isinstance(data_cfg.sources[0], SourceConfig) and data_cfg.seq_len == 64
    data_cfg.validate()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"sources": []}, r"data\.sources must name"),
        ({"seq_len": 1}, r"data\.seq_len must be >= 2"),
        ({"eval_fraction": 1.0}, r"data\.eval_fraction"),
        ({"eval_batches": -1}, r"data\.eval_batches"),
        ({"tokenizer": "/no/such/tokenizer"}, r"data\.tokenizer"),
        (
            {"sources": [SourceConfig("a", "stdlib:prose"), SourceConfig("b", "stdlib:x")]},
            r"data\.sources\[1\]\.path: unknown built-in",
        ),
        (
            {"sources": [SourceConfig("a", "stdlib:prose"), SourceConfig("a", "stdlib:code")]},
            r"data\.sources\[1\]\.name: duplicate source name 'a'",
        ),
        (
            {"sources": [SourceConfig("a", "stdlib:prose"), SourceConfig("b", "stdlib:code", -1)]},
            r"data\.sources\[1\]\.weight must be >= 0",
        ),
        (
            {"sources": [SourceConfig("a", "stdlib:prose", 0.0)]},
            r"data\.sources: the weights sum to zero",
        ),
        ({"sources": [SourceConfig("", "stdlib:prose")]}, r"data\.sources\[0\]\.name"),
        (
            {"sources": [SourceConfig("a", "/x/y.jsonl")]},
            r"data\.sources\[0\]\.path: /x/y\.jsonl does not exist",
        ),
    ],
)
def test_bad_values_name_the_key(changes, message):
    with pytest.raises(ValueError, match=message):
        cfg_with(**changes).validate()


def test_unsupported_file_type(tmp_path):
    csv = tmp_path / "data.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"data\.sources\[0\]\.path: .*data\.csv is not one of"):
        cfg_with(sources=[SourceConfig("a", str(csv))]).validate()
