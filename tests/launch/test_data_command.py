"""`perennial data prepare` as users run it: killed and rerun, trained from, bad input."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.trainer.data.conftest import save_tiny_hf_tokenizer
from tests.trainer.runs import REPO, metrics, perennial, tiny_job
from trainer.data import build_data
from trainer.data.config import DataConfig, SourceConfig
from trainer.data.prepare import PAUSE_ENV, prepare


def write_corpus(path: Path, count: int) -> str:
    """A gzipped jsonl corpus of `count` varied documents."""
    lines = (json.dumps({"text": f"story {i}: " + "the quick brown fox " * (1 + i % 9)})
             for i in range(count))
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    return str(path)


def sources_override(name: str, path: str, extra: str = "") -> str:
    return f"data.sources=[{{name: {name}, path: '{path}'{extra}}}]"


def test_readme_prepare_then_train(tmp_path):
    tokenizer = save_tiny_hf_tokenizer(tmp_path / "tokenizer")
    corpus = write_corpus(tmp_path / "web.jsonl.gz", 600)
    out = str(tmp_path / "web")
    proc = perennial("data", "prepare", corpus, out, "--tokenizer", tokenizer, "--num-proc", "2")
    assert "600 documents" in proc.stdout
    assert perennial("data", "verify", out).stdout.strip() == f"{out}: intact"
    perennial("train", *tiny_job(tmp_path / "run", tmp_path / "cache", "train.max_steps=3"),
              f"data.tokenizer={tokenizer}", sources_override("web", out))
    records = metrics(tmp_path / "run")
    assert records[-1]["tokens_by_source"] == {"web": 3 * 12 * 32}
    assert not (tmp_path / "cache" / "prepared").exists()  # read as prepared, not re-tokenised


def test_killed_prepare_is_never_taken_for_complete_and_resumes(tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl.gz", 3000)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), PAUSE_ENV: "3"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch.cli", "data", "prepare", corpus, str(out),
         "--tokenizer", "bytes", "--shard-tokens", "20000"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while not (out / "part-00000.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # while part 1 waits, written but not committed
    proc.wait()
    assert not (out / "manifest.json").exists()
    assert list(out.glob(".part-00001.bin.*.tmp"))  # the torn part is only a temporary file
    cfg = DataConfig(sources=[SourceConfig("c", str(out))], seq_len=16,
                     cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"incomplete `perennial data prepare` output"):
        build_data(cfg, 0, 4, 4)
    assert perennial("data", "verify", str(out), check=False).returncode == 2
    rerun = perennial("data", "prepare", corpus, str(out), "--tokenizer", "bytes",
                      "--shard-tokens", "20000")
    assert "resuming after 1 complete part(s)" in rerun.stdout
    fresh = prepare(corpus, str(tmp_path / "fresh"), "bytes", shard_tokens=20000)
    assert json.loads((out / "manifest.json").read_text()) == fresh
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "fresh").iterdir())
    for name in names:
        assert (out / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name


def test_resume_into_another_world_size_from_prepared_shards(tmp_path):
    out = str(tmp_path / "shards")
    prepare(write_corpus(tmp_path / "c.jsonl.gz", 1500), out, "bytes", shard_tokens=15000)
    job = ["schedule.total_steps=6", "checkpoint.persist_interval=3", "data.record_sample_ids=true",
           sources_override("web", out), "data.prefetch=2"]
    reference = tmp_path / "reference"
    perennial("train", *tiny_job(reference, tmp_path / "cache", *job, "train.max_steps=6"))
    run = tmp_path / "run"
    perennial("train", *tiny_job(run, tmp_path / "cache", *job, "train.max_steps=3"),
              "--nproc", "2", "parallel.strategy=ddp")
    perennial("train", *tiny_job(run, tmp_path / "cache", *job, "train.max_steps=6"))
    expected = {r["step"]: r["sample_ids"] for r in metrics(reference)}
    resumed = {r["step"]: r["sample_ids"] for r in metrics(run)}
    assert sorted(resumed) == list(range(1, 7))
    assert resumed == expected
    assert metrics(run)[-1]["tokens_by_source"] == metrics(reference)[-1]["tokens_by_source"]


@pytest.mark.parametrize(
    "override, fragment",
    [
        (", text_column: body", "no column 'body'"),
        ("", "model.vocab_size (100)"),
    ],
    ids=["missing-column", "vocab-too-large"],
)
def test_bad_data_fails_on_one_line_before_workers_start(tmp_path, override, fragment):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"doc {i} " * 9}) + "\n" for i in range(50)))
    extra = ["model.vocab_size=100"] if "vocab" in fragment else []
    proc = perennial("train", *tiny_job(tmp_path / "run", tmp_path / "cache", *extra),
                     sources_override("docs", str(docs), override), "--nproc", "2", check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert err.count("\n") == 0 and fragment in err and "Traceback" not in err, err
    assert "torch.distributed" not in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
