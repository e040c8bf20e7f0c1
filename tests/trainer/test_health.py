"""The hang watchdog (trainer/health.py): a rank stuck past `train.hang_timeout_s` dumps its
stacks and exits, torchrun restarts the group under --max-restarts, the group resumes from the
newest memory snapshot and the run ends bitwise equal to an uninterrupted one."""

from __future__ import annotations

import os
import re
import threading
import time

import pytest
import torch

from tests.trainer.runs import metrics, perennial, tiny_job
from tests.trainer.test_resume import assert_bitwise_equal, final_weights
from trainer.gpu_probe import GpuProbe
from trainer.health import HANG_EXIT_CODE, HealthMonitor, validate_hang_timeout

MAX_STEPS = 6
JOB = ["checkpoint.interval=1", "checkpoint.persist_interval=4", f"train.max_steps={MAX_STEPS}"]


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cache")


def test_negative_hang_timeout_is_a_user_error():
    with pytest.raises(ValueError, match="train.hang_timeout_s"):
        validate_hang_timeout(-1)


def test_cli_rejects_negative_hang_timeout(tmp_path, data_cache):
    proc = perennial("train", *tiny_job(tmp_path, data_cache, "train.hang_timeout_s=-1"),
                     check=False)
    assert proc.returncode != 0
    assert "train.hang_timeout_s" in proc.stderr and "Traceback" not in proc.stderr


def test_watchdog_leaves_slow_but_finishing_steps_alone():
    monitor = HealthMonitor(2.0, rank=0, device=torch.device("cpu"))
    fired = threading.Event()
    monitor.fail = lambda reason, code: fired.set()
    for step in range(1, 4):
        monitor.step_started(step)
        time.sleep(0.5)
        monitor.step_finished()
    time.sleep(2.5)  # idle between steps is not a hang either
    monitor.close()
    assert not fired.is_set()


def test_watchdog_reports_a_stuck_step():
    monitor = HealthMonitor(0.5, rank=3, device=torch.device("cpu"))
    calls = []
    done = threading.Event()
    monitor.fail = lambda reason, code: (calls.append((reason, code)), done.set())
    monitor.step_started(7)
    assert done.wait(30), "the watchdog never fired"
    monitor.close()
    reason, code = calls[0]
    assert code == HANG_EXIT_CODE and "step 7" in reason and "hang_timeout_s=0.5" in reason


@pytest.mark.slow
def test_hung_rank_is_restarted_from_the_snapshot_and_the_run_completes(tmp_path, data_cache):
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    perennial("train", *tiny_job(ref_dir, data_cache, *JOB), "--nproc", "2")

    os.environ.update(PERENNIAL_FAULT_SLEEP_AT_STEP="4", PERENNIAL_FAULT_RANK="1")
    try:
        proc = perennial("train", *tiny_job(run_dir, data_cache, *JOB, "train.hang_timeout_s=8"),
                         "--nproc", "2", "--max-restarts", "1")
    finally:
        for key in ("PERENNIAL_FAULT_SLEEP_AT_STEP", "PERENNIAL_FAULT_RANK"):
            os.environ.pop(key)
    output = proc.stdout + proc.stderr
    assert "error: rank 1: step 4 has run" in output
    assert f"exiting with code {HANG_EXIT_CODE}" in output
    # The restarted group resumed from the memory snapshot of step 3, not from scratch.
    assert re.search(r"resumed from memory:\S+ \(step 3\)", output), output
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, MAX_STEPS + 1))
    assert_bitwise_equal(final_weights(run_dir, tmp_path), final_weights(ref_dir, tmp_path))


# -- the GPU probe: real NVML where there is a GPU, its decisions against a stand-in here ----
def test_probe_declines_a_cpu_device():
    probe, why = GpuProbe.open(torch.device("cpu"))
    assert probe is None and "not a GPU" in why


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and its driver")
def test_probe_samples_a_real_gpu():
    probe, why = GpuProbe.open(torch.device("cuda", 0))
    assert probe is not None, why
    try:
        record = probe.sample()
        assert record["mem_total_gib"] > 0 and "util_gpu_pct" in record
        assert probe.fatal_error() == ""
    finally:
        probe.close()


class StandInNvml:
    """NVML as a driver answers: counters, one pending XID event, NotSupported for temperature."""

    NVMLError = RuntimeError
    NVML_MEMORY_ERROR_TYPE_CORRECTED, NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 0, 1
    NVML_VOLATILE_ECC, NVML_TEMPERATURE_GPU, nvmlEventTypeXidCriticalError = 0, 0, 8

    def __init__(self):
        self.uncorrected, self.events = 0, []

    def nvmlDeviceGetTotalEccErrors(self, handle, kind, counter):
        return self.uncorrected if kind == self.NVML_MEMORY_ERROR_TYPE_UNCORRECTED else 5

    def nvmlEventSetCreate(self):
        return "events"

    def nvmlDeviceRegisterEvents(self, handle, kind, events):
        pass

    def nvmlEventSetWait_v2(self, events, timeout_ms):
        if not self.events:
            raise self.NVMLError("timeout")
        return type("Event", (), {"eventData": self.events.pop(0)})

    def nvmlDeviceGetTemperature(self, handle, sensor):
        raise self.NVMLError("not supported")


def test_probe_flags_fatal_xids_and_new_uncorrectable_errors():
    nvml = StandInNvml()
    nvml.uncorrected = 2  # errors from before the job are not this job's problem
    probe = GpuProbe(nvml, handle=None, name="H100")
    assert probe.fatal_error() == ""
    nvml.events = [13, 79]  # an application fault (ignored), then "fallen off the bus"
    assert probe.fatal_error() == "GPU H100 reported fatal XID 79"
    nvml.uncorrected = 3
    assert probe.fatal_error() == "GPU H100 reported 1 uncorrectable ECC error(s)"
    record = probe.sample()
    assert record["ecc_corrected"] == 5 and "temp_c" not in record
