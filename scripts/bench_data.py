"""Data: `perennial data prepare` with 1 and 2 processes, peak memory vs corpus size, and
training from prepared shards vs the in-RAM packing path Perennial used before.

    python scripts/bench_data.py            # a 200 MB (gzip) corpus, writes docs/benchmarks.md
    python scripts/bench_data.py --quick --out -

The corpus is generated (jsonl.gz of documents of random words from a 30,000-word vocabulary)
and tokenised with a byte-level BPE (8,192 tokens) trained on its first megabytes. Every run is
a subprocess whose peak memory is the largest sum of RSS over its process tree (sampled every
0.1 s). Compared: our prepare with 1 and 2 processes (target 2x); Hugging Face `datasets`
`load_dataset(...).map(tokenize, num_proc=2)`, what a user would write instead; the in-RAM
build of the old path (tokenise everything in memory, flatten, pack); and training, from our
shards (memory maps + prefetch) vs rows gathered synchronously from one packed .npy memmap.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.report import REPO, emit, machine_facts, verdict  # noqa: E402

FULL_MB, QUICK_MB = 200, 12
VOCAB_WORDS, BPE_VOCAB, SEQ, BATCH, TRAIN_STEPS = 30_000, 8192, 128, 16, 40


def generate_corpus(path: Path, compressed_mb: float, seed: int = 0) -> None:
    """Documents of 50-800 random words; blocks of fresh documents until the file is big enough."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkqjxz"))
    weights = 1.0 / np.arange(1, len(letters) + 1)
    words = ["".join(rng.choice(letters, size=rng.integers(2, 10), p=weights / weights.sum()))
             for _ in range(VOCAB_WORDS)]
    zipf = 1.0 / np.arange(1, VOCAB_WORDS + 1) ** 0.8
    zipf /= zipf.sum()
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6) as out:
        doc = 0
        while raw.tell() < compressed_mb * 2**20:
            ids = rng.choice(VOCAB_WORDS, size=200_000, p=zipf)
            lengths = rng.integers(50, 800, size=len(ids) // 50)
            for chunk in np.split(ids, np.cumsum(lengths))[:-1]:
                text = " ".join(words[i] for i in chunk)
                out.write((json.dumps({"text": f"{doc}. {text}"}) + "\n").encode())
                doc += 1


def train_tokenizer(corpus: Path, directory: Path) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    with gzip.open(corpus, "rt") as handle:
        sample = [json.loads(next(handle))["text"] for _ in range(3000)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(sample, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(directory))
    return str(directory)


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS of the process tree in MiB, stdout) of a subprocess."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", **(env or {})}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    peak = [0]

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in tree))
            except psutil.Error:
                pass
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    sampler.join()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out}\n{err}")
    return time.perf_counter() - start, peak[0] / 2**20, out


def prepare_run(corpus: Path, out: Path, tokenizer: str, num_proc: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "launch.cli", "data", "prepare", str(corpus), str(out),
           "--tokenizer", tokenizer, "--num-proc", str(num_proc), "--shard-tokens", str(1 << 25)]
    seconds, peak, _ = run_measured(cmd)
    manifest = json.loads((out / "manifest.json").read_text())
    return {"seconds": seconds, "peak_mib": peak, "tokens": manifest["tokens"]}


HF_MAP = """
import sys, time, numpy as np, pyarrow.compute as pc
from datasets import load_dataset
from transformers import AutoTokenizer
corpus, tokenizer, cache, num_proc = sys.argv[1:5]
tok = AutoTokenizer.from_pretrained(tokenizer)
ds = load_dataset("json", data_files=corpus, split="train", cache_dir=cache)
out = ds.map(lambda b: {"ids": tok(b["text"])["input_ids"]}, batched=True,
             remove_columns=["text"], num_proc=int(num_proc))
print(pc.sum(pc.list_value_length(out.data.column("ids"))).as_py())
"""

OLD_BUILD = """
import sys, numpy as np, pyarrow.compute as pc
from datasets import load_dataset
from trainer.data.tokenizer import build_tokenizer
corpus, tokenizer, cache = sys.argv[1:4]
tok = build_tokenizer(tokenizer)
ds = load_dataset("json", data_files=corpus, split="train", cache_dir=cache)
eos = np.array([tok.eos_id])
out = ds.map(lambda b: {"ids": [np.concatenate([i, eos]) for i in tok.encode_batch(b["text"])]},
             batched=True, remove_columns=["text"], keep_in_memory=True)
flat = pc.list_flatten(out.data.column("ids")).to_numpy()
n = len(flat) // 129
rows = flat[: n * 129].reshape(n, 129).astype(np.uint16)
print(len(flat))
"""


def script_run(code: str, *args: str) -> dict:
    seconds, peak, out = run_measured([sys.executable, "-c", code, *args],
                                      {"TOKENIZERS_PARALLELISM": "false"})
    return {"seconds": seconds, "peak_mib": peak, "tokens": int(out.strip().splitlines()[-1])}


def train_run(workdir: Path, name: str, shards: Path, tokenizer: str) -> dict:
    run_dir = workdir / f"train-{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "launch.cli", "train", f"run.dir={run_dir}",
           f"data.cache_dir={workdir / 'cache'}", f"data.tokenizer={tokenizer}",
           f"data.sources=[{{name: web, path: '{shards}'}}]", f"data.seq_len={SEQ}",
           f"train.max_steps={TRAIN_STEPS}", f"train.global_batch_size={BATCH}",
           "train.micro_batch_size=8", "train.log_interval=10", "eval.interval=0",
           "schedule.warmup_steps=5", "log.progress=false",
           f"checkpoint.persist_interval={TRAIN_STEPS}"]
    seconds, peak, _ = run_measured(cmd)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if r["step"] > 10 and r["step"] % 10 == 0]
    return {"seconds": seconds, "peak_mib": peak, "tokens_per_s": statistics.median(rates)}


LOADER_LOOP = """
import sys, json, time, numpy as np, torch, torch.nn.functional as F
from trainer.data import DataConfig, SourceConfig, build_data
from trainer.model import Llama, ModelConfig
shards, tokenizer, npy, kind, steps, batch, seq = sys.argv[1:8]
steps, batch, seq = int(steps), int(batch), int(seq)
cfg = DataConfig(sources=[SourceConfig("web", shards)], seq_len=seq, tokenizer=tokenizer,
                 cache_dir=shards + "-cache", prefetch=2 if kind == "shards" else 0)
data = build_data(cfg, 0, batch, batch)
if kind == "npy":  # the old path: one packed .npy, memory-mapped, rows gathered in the step
    rows = np.load(npy, mmap_mode="r")
    def next_batch():
        refs = data.stream.take(batch)
        block = torch.from_numpy(np.stack([rows[r.index] for r in refs]).astype(np.int64))
        return block[:, :-1].contiguous(), block[:, 1:].contiguous()
else:
    def next_batch():
        return data.next_step_batches(0, 1)[0]
torch.manual_seed(0)
model = Llama(ModelConfig(vocab_size=data.vocab_size))
model.init_weights()
optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
times = []
for step in range(steps):
    start = time.perf_counter()
    inputs, targets = next_batch()
    loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
    loss.backward(); optim.step(); optim.zero_grad()
    times.append(time.perf_counter() - start)
print(json.dumps(times[5:]))
"""


def loader_rates(shards: Path, tokenizer: str, npy: Path, kind: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", LOADER_LOOP, str(shards), tokenizer, str(npy), kind,
         str(TRAIN_STEPS), str(BATCH), str(SEQ)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True, capture_output=True,
        text=True,
    ).stdout
    return BATCH * SEQ / statistics.median(json.loads(out.strip().splitlines()[-1]))


def write_npy(shards: Path, npy: Path) -> None:
    from trainer.data.shards import TokenShards

    tokens = TokenShards(str(shards))
    n = tokens.num_tokens // (SEQ + 1)
    rows = np.lib.format.open_memmap(npy, mode="w+", dtype=tokens.dtype, shape=(n, SEQ + 1))
    step = 1 << 16
    for start in range(0, n, step):
        stop = min(n, start + step)
        rows[start:stop] = tokens.read(start * (SEQ + 1), stop * (SEQ + 1)).reshape(-1, SEQ + 1)
    rows.flush()


def run(compressed_mb: float, workdir: Path) -> dict:
    small_mb = compressed_mb / 4
    corpus, small = workdir / "corpus.jsonl.gz", workdir / "small.jsonl.gz"
    for path, size, seed in ((corpus, compressed_mb, 0), (small, small_mb, 1),
                             (workdir / "eighth.jsonl.gz", compressed_mb / 8, 2)):
        if not path.exists():  # a --workdir of an earlier run keeps its corpora
            generate_corpus(path, size, seed)
    tokenizer = train_tokenizer(small, workdir / "tokenizer")
    r: dict = {"mb": corpus.stat().st_size / 2**20, "small_mb": small.stat().st_size / 2**20}
    with gzip.open(corpus, "rb") as handle:
        r["raw_mb"] = sum(len(block) for block in iter(lambda: handle.read(1 << 24), b"")) / 2**20
    print(f"corpus {r['mb']:.0f} MB gzip ({r['raw_mb']:.0f} MB raw)", flush=True)
    r["prep1"] = prepare_run(corpus, workdir / "p1", tokenizer, 1)
    print("prepare 1:", r["prep1"], flush=True)
    r["prep2"] = prepare_run(corpus, workdir / "p2", tokenizer, 2)
    print("prepare 2:", r["prep2"], flush=True)
    r["prep2_small"] = prepare_run(small, workdir / "s2", tokenizer, 2)
    r["hf_small"] = script_run(HF_MAP, str(small), tokenizer, str(workdir / "hf"), "2")
    print("hf map 2 (small):", r["hf_small"], flush=True)
    eighth = workdir / "eighth.jsonl.gz"
    r["old_eighth"] = script_run(OLD_BUILD, str(eighth), tokenizer, str(workdir / "old8"))
    r["old_small"] = script_run(OLD_BUILD, str(small), tokenizer, str(workdir / "old4"))
    r["eighth_mb"] = eighth.stat().st_size / 2**20
    print("old build:", r["old_eighth"], r["old_small"], flush=True)
    r["train_full"] = train_run(workdir, "full", workdir / "p2", tokenizer)
    r["train_small"] = train_run(workdir, "small", workdir / "s2", tokenizer)
    print("train:", r["train_full"], r["train_small"], flush=True)
    write_npy(workdir / "p2", workdir / "packed.npy")
    r["loop_npy"], r["loop_shards"] = [], []
    for _ in range(2):  # alternating rounds
        r["loop_npy"].append(loader_rates(workdir / "p2", tokenizer, workdir / "packed.npy", "npy"))
        r["loop_shards"].append(loader_rates(workdir / "p2", tokenizer, workdir / "x", "shards"))
    print("loops:", r["loop_npy"], r["loop_shards"], flush=True)
    return r


def slope(mib_big: float, mib_small: float, mb_big: float, mb_small: float) -> float:
    """MiB of peak memory per 100 MB more (gzip) corpus."""
    return (mib_big - mib_small) / (mb_big - mb_small) * 100


def report(r: dict) -> str:
    p1, p2 = r["prep1"], r["prep2"]
    speedup = p1["seconds"] / p2["seconds"]
    prep_slope = slope(p2["peak_mib"], r["prep2_small"]["peak_mib"], r["mb"], r["small_mb"])
    old_slope = slope(r["old_small"]["peak_mib"], r["old_eighth"]["peak_mib"], r["small_mb"],
                      r["eighth_mb"])
    train_slope = slope(r["train_full"]["peak_mib"], r["train_small"]["peak_mib"], r["mb"],
                        r["small_mb"])
    npy, shards = statistics.median(r["loop_npy"]), statistics.median(r["loop_shards"])
    row = "| {} | {:.1f} | {:,.0f} | {:,.0f} | {:.2f} |"
    mtok = lambda x: x["tokens"] / x["seconds"] / 1e3  # noqa: E731
    lines = [
        "## Data (`scripts/bench_data.py`)",
        "",
        f"Machine: {machine_facts()}; the 2 cores were shared with other jobs during the run. "
        f"Corpus: generated jsonl.gz, {r['mb']:.0f} MB compressed ({r['raw_mb']:.0f} MB of "
        f"JSON), BPE tokenizer with {BPE_VOCAB} tokens (uint16 shards), {p1['tokens']:,} tokens. "
        "One run per row; peak memory is the whole process tree's RSS.",
        "",
        "### Prepare throughput",
        "",
        "| run | seconds | k tokens/s | peak MiB | MB (gzip)/s |",
        "|---|---|---|---|---|",
        row.format("perennial data prepare, 1 process", p1["seconds"], mtok(p1), p1["peak_mib"],
                   r["mb"] / p1["seconds"]),
        row.format("perennial data prepare, 2 processes", p2["seconds"], mtok(p2), p2["peak_mib"],
                   r["mb"] / p2["seconds"]),
        "",
        f"2 processes vs 1: {speedup:.2f}x against the ideal 2.00x ({speedup / 2:.0%} of "
        "ideal; the reading/writing main process and the other jobs share the same 2 cores).",
        "",
        f"Same tool side by side on the {r['small_mb']:.0f} MB corpus, 2 processes each:",
        "",
        "| run | seconds | k tokens/s | peak MiB |",
        "|---|---|---|---|",
        f"| perennial data prepare | {r['prep2_small']['seconds']:.1f} | "
        f"{mtok(r['prep2_small']):,.0f} | {r['prep2_small']['peak_mib']:,.0f} |",
        f"| HF datasets load_dataset + map(num_proc=2) | {r['hf_small']['seconds']:.1f} | "
        f"{mtok(r['hf_small']):,.0f} | {r['hf_small']['peak_mib']:,.0f} |",
        "",
        "### Peak memory vs corpus size",
        "",
        "| what | small corpus | large corpus | slope (MiB per 100 MB gzip) |",
        "|---|---|---|---|",
        f"| prepare, 2 processes | {r['prep2_small']['peak_mib']:,.0f} MiB at {r['small_mb']:.0f}"
        f" MB | {p2['peak_mib']:,.0f} MiB at {r['mb']:.0f} MB | {prep_slope:+.1f} |",
        f"| old in-RAM build (tokenise all, flatten, pack) | {r['old_eighth']['peak_mib']:,.0f} "
        f"MiB at {r['eighth_mb']:.0f} MB | {r['old_small']['peak_mib']:,.0f} MiB at "
        f"{r['small_mb']:.0f} MB | {old_slope:+.1f} |",
        f"| training ({TRAIN_STEPS} steps) from prepared shards | "
        f"{r['train_small']['peak_mib']:,.0f} MiB | {r['train_full']['peak_mib']:,.0f} MiB | "
        f"{train_slope:+.1f} |",
        "",
        f"Target: no growth with corpus size. Prepare: {prep_slope:+.1f} MiB per 100 MB "
        f"({verdict(abs(prep_slope) < 10)}); training: {train_slope:+.1f} "
        f"({verdict(abs(train_slope) < 10)}); the old build grew by {old_slope:+.0f}. Left: "
        "training's per-epoch permutation is 8 bytes per sequence (about 2 MiB per 100 MB here).",
        "",
        "### Training throughput",
        "",
        f"Tiny Llama, batch {BATCH} × {SEQ}, one process, median step over {TRAIN_STEPS - 5} "
        "steps, 2 alternating rounds; same samples in the same order.",
        "",
        "| batches from | tokens/s | vs old path |",
        "|---|---|---|",
        f"| packed .npy memmap, gathered in the step (old path) | {npy:,.0f} | 1.000x |",
        f"| prepared shards, memory maps + prefetch thread | {shards:,.0f} | {shards / npy:.3f}x |",
        "",
        f"Target: not slower (≥ 0.97x allowing noise). Measured {shards / npy:.3f}x "
        f"({verdict(shards / npy >= 0.97)}). `perennial train` from the large corpus: "
        f"{r['train_full']['tokens_per_s']:,.0f} tokens/s (small: "
        f"{r['train_small']['tokens_per_s']:,.0f}).",
    ]
    return "\n".join(lines)


def markdown(quick: bool, workdir: str = "") -> str:
    size = QUICK_MB if quick else FULL_MB
    if workdir:
        return report(run(size, Path(workdir)))
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        return report(run(size, Path(tmp)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"a {QUICK_MB} MB corpus")
    parser.add_argument("--out", default="docs/benchmarks.md", help="report file, or - to print")
    parser.add_argument("--workdir", default="", help="keep corpora and outputs here (reused)")
    args = parser.parse_args()
    emit("data", markdown(args.quick, args.workdir), args.out)


if __name__ == "__main__":
    main()
