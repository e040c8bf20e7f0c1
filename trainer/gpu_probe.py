"""One GPU seen through NVML (`pynvml`, from nvidia-ml-py): utilisation, memory, temperature,
ECC counters, and the fatal errors (uncorrectable ECC, critical XIDs) after which the device
cannot be trusted and the rank should be restarted elsewhere or after a reset."""

from __future__ import annotations

import torch

# XIDs that mean the GPU (not the program) is broken: double-bit/uncontained ECC, page
# retirement or row-remap failure, NVLink error, fallen off the bus, GSP/firmware errors.
# Application faults (13, 31, 43: illegal address, MMU fault) crash the process on their own.
FATAL_XIDS = frozenset({48, 62, 64, 74, 79, 94, 95, 119, 120})


class GpuProbe:
    def __init__(self, nvml, handle, name: str):
        self.nvml = nvml
        self.handle = handle
        self.name = name
        self.events = self._register_xid_events()
        self.uncorrected_at_start = self._uncorrected_ecc()

    @classmethod
    def open(cls, device: torch.device) -> tuple[GpuProbe | None, str]:
        """The probe for `device`, or None and why NVML cannot watch it."""
        if device.type != "cuda":
            return None, f"device is {device.type}, not a GPU"
        try:
            import pynvml as nvml

            nvml.nvmlInit()
        except Exception as err:  # noqa: BLE001 - no driver, no library: stay out of the way
            return None, f"NVML unavailable ({err})"
        try:
            handle = _handle_for(nvml, device)
            return cls(nvml, handle, nvml.nvmlDeviceGetName(handle)), ""
        except nvml.NVMLError as err:
            return None, f"NVML cannot open {device} ({err})"

    def sample(self) -> dict:
        nvml, handle = self.nvml, self.handle
        readers = [
            lambda: _utilisation(nvml, handle),
            lambda: _memory(nvml, handle),
            lambda: {"temp_c": nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)},
            lambda: {"ecc_corrected": self._ecc(nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED)},
            lambda: {"ecc_uncorrected": self._ecc(nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED)},
        ]
        record: dict = {}
        for read in readers:
            record.update(_try(read))
        return record

    def fatal_error(self) -> str:
        """A description of a fatal device error seen since the probe opened, or ''."""
        xid = self._next_fatal_xid()
        if xid:
            return f"GPU {self.name} reported fatal XID {xid}"
        uncorrected = self._uncorrected_ecc()
        if uncorrected is not None and self.uncorrected_at_start is not None:
            if uncorrected > self.uncorrected_at_start:
                new = uncorrected - self.uncorrected_at_start
                return f"GPU {self.name} reported {new} uncorrectable ECC error(s)"
        return ""

    def close(self) -> None:
        try:
            if self.events is not None:
                self.nvml.nvmlEventSetFree(self.events)
            self.nvml.nvmlShutdown()
        except self.nvml.NVMLError:
            pass

    # -- counters and events ------------------------------------------------------------------
    def _ecc(self, kind) -> int:
        return self.nvml.nvmlDeviceGetTotalEccErrors(self.handle, kind, self.nvml.NVML_VOLATILE_ECC)

    def _uncorrected_ecc(self) -> int | None:
        try:
            return self._ecc(self.nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED)
        except self.nvml.NVMLError:  # ECC off or not supported (consumer GPUs)
            return None

    def _register_xid_events(self):
        nvml = self.nvml
        try:
            events = nvml.nvmlEventSetCreate()
            nvml.nvmlDeviceRegisterEvents(self.handle, nvml.nvmlEventTypeXidCriticalError, events)
            return events
        except nvml.NVMLError:  # not supported on this device/driver, or not permitted
            return None

    def _next_fatal_xid(self) -> int:
        if self.events is None:
            return 0
        while True:
            try:
                event = self.nvml.nvmlEventSetWait_v2(self.events, 0)
            except self.nvml.NVMLError:  # NVML_ERROR_TIMEOUT: no event pending
                return 0
            if event.eventData in FATAL_XIDS:
                return int(event.eventData)


def _handle_for(nvml, device: torch.device):
    """NVML numbers devices ignoring CUDA_VISIBLE_DEVICES, so match on the UUID."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", "") or "")
    if uuid:
        return nvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    return nvml.nvmlDeviceGetHandleByIndex(index)


def _utilisation(nvml, handle) -> dict:
    rates = nvml.nvmlDeviceGetUtilizationRates(handle)
    return {"util_gpu_pct": rates.gpu, "util_mem_pct": rates.memory}


def _memory(nvml, handle) -> dict:
    info = nvml.nvmlDeviceGetMemoryInfo(handle)
    return {"mem_used_gib": info.used / 2**30, "mem_total_gib": info.total / 2**30}


def _try(read) -> dict:
    """One counter a device does not support must not hide the others."""
    try:
        return read()
    except Exception:  # noqa: BLE001 - NVMLError_NotSupported and kin
        return {}
