import json
import os
import subprocess

import pytest
import torch

from tests.trainer.runs import metrics, perennial, tiny_job
from trainer.config import LogConfig
from trainer.metrics import MetricsLogger, format_line, peak_flops
from trainer.run_identity import read_run_id


def test_jsonl_line_per_step_and_truncate_after_resume(tmp_path, capsys):
    logger = MetricsLogger(str(tmp_path), enabled=True)
    for step in (1, 10, 20):
        logger.log({"step": step, "loss": 3.0 / step, "lr": 1e-3, "tokens_per_s": 1000.0})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 10, 20]
    assert "step     10  loss 0.3000" in capsys.readouterr().out
    logger.truncate_after(10)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 10]


def test_disabled_logger_on_other_ranks_writes_nothing(tmp_path):
    MetricsLogger(str(tmp_path), enabled=False).log({"step": 1, "loss": 1.0})
    assert not (tmp_path / "metrics.jsonl").exists()


def test_wandb_runs_offline_by_default(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    logger = MetricsLogger(str(tmp_path), enabled=True, wandb_cfg=LogConfig(wandb=True))
    logger.log({"step": 1, "loss": 2.0, "eval_loss": {"prose": 2.5}})
    logger.close()
    assert list((tmp_path / "wandb").glob("offline-run-*")), "expected an offline W&B run"


def test_line_format_and_mfu_peaks():
    line = format_line({"step": 5, "loss": 1.5, "mfu": 0.41, "eval_loss": {"code": 2.0}})
    assert "mfu 41.0%" in line and "eval[code] 2.0000" in line
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("cpu") is None


def wandb_history(run_dir) -> tuple[set[str], list[dict], list[dict]]:
    """Every offline W&B session of a run, read back with W&B's own reader of its transaction
    log (`wandb leet inspect --json`): the run ids, run records and history rows."""
    ids, runs, rows = set(), [], []
    for session in sorted((run_dir / "wandb").glob("offline-run-*")):
        ids.add(session.name.rsplit("-", 1)[1])
        out = subprocess.run(["wandb", "leet", "inspect", "--json", str(session)],
                             capture_output=True, text=True, timeout=120, check=True).stdout
        records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        runs += [r["run"] for r in records if r.get("type") == "run"]
        rows += [r["history"] for r in records if r.get("type") == "history"]
    return ids, runs, rows


@pytest.mark.slow
def test_killed_and_resumed_twice_is_one_wandb_run_with_each_step_once(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    # Memory snapshots every 3 steps; each kill falls 2 steps after one, so each restart
    # repeats 2 logged steps: 4-5 after the kill at 5, 7-8 after the kill at 8.
    faults = f"step@5#0:kill:{tmp_path / 'k5'};step@8#0:kill:{tmp_path / 'k8'}"
    perennial("train", *tiny_job(run_dir, data_cache, "train.max_steps=10",
                                 "schedule.total_steps=10", "checkpoint.interval=3",
                                 "checkpoint.persist_interval=6", "log.wandb=true",
                                 "run.name=my-experiment"),
              "--max-restarts", "2",
              env={"WANDB_MODE": "offline", "WANDB_SILENT": "true",
                   "PERENNIAL_FAULT_PAUSE": faults})  # fmt: skip
    ids, runs, rows = wandb_history(run_dir)
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 3, "one session per start"
    assert ids == {read_run_id(run_dir)}, "every session is the run's own W&B run"
    # A killed session loses what W&B had not flushed yet (run record and rows alike): the
    # rows come back from metrics.jsonl on the resume.
    assert runs and {r["display_name"] for r in runs} == {"my-experiment"}
    steps = [row["step"]["num"] for row in rows]
    assert steps == list(range(1, 11)), f"each step once, in order: {steps}"
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 11))


def test_lines_say_where_the_run_is():
    line = format_line({"step": 120, "loss": 2.0, "tokens_per_s": 264.0,
                        "tokens_per_s_smooth": 4936.0, "elapsed_s": 75.2, "eta_s": 3700}, 300)
    assert line.startswith("step    120/300  loss 2.0000")
    assert "tok/s 4,936" in line and "elapsed 1m15s" in line and "eta 1h01m" in line


def test_smoothed_throughput_leaves_out_the_warm_up_interval(monkeypatch):
    import torch

    from trainer.metrics import Throughput

    clock = iter([0.0, 10.0, 11.0, 12.0, 13.0])  # reset; the first step took 10 s, then 1 s each
    monkeypatch.setattr("trainer.metrics.time.perf_counter", lambda: next(clock))
    meter = Throughput(1.0, 1, torch.device("cpu"), max_steps=10)
    rates = []
    for step in range(1, 5):
        meter.add(100)
        rates.append(meter.measure(step))
    assert rates[0]["tokens_per_s"] == 10.0 and rates[0]["tokens_per_s_smooth"] == 10.0
    assert [r["tokens_per_s_smooth"] for r in rates[1:]] == [100.0, 100.0, 100.0]
    assert rates[-1]["eta_s"] == 6.0 and rates[-1]["elapsed_s"] == 13.0
def test_peak_rss_is_measured_and_on_the_step_line():
    from trainer.metrics import max_peak_rss_gib, peak_rss_bytes

    ballast = torch.ones(64 * 2**20)  # 256 MiB resident: the high-water mark is above it
    resident = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    assert resident >= ballast.numel() * 4
    assert peak_rss_bytes() >= resident - 16 * 2**20  # the kernel syncs its counters lazily
    assert abs(max_peak_rss_gib(torch.device("cpu")) - peak_rss_bytes() / 2**30) < 0.02
    del ballast
    assert "rss 1.23GiB" in format_line({"step": 1, "peak_rss_gib": 1.234})
