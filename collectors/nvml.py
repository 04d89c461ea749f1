"""Read the GPUs of this machine through NVML (nvidia-ml-py) at a fixed rate.

Cost decides what is read when (measured on an H200, fixtures/h200-nvml-trace/nvml_latency.json):
utilization, power, clocks, temperature and clocks-event reasons cost about 1 us per call and memory
info 5 us, so they are read every tick; the total-energy counter costs 3.8 ms per call, so it is
read only every `slow_interval_s` and left out of the ticks in between (it is cumulative: agents
take differences). PCIe throughput (21 ms per call) is not read at all.

XID errors come from NVML events (XidCriticalError), polled without blocking once per tick; where
the driver or container does not allow events, `xid` is simply left out. MIG instances are not
reported here (use the dcgm source). Without a driver (libnvidia-ml missing, or nvmlInit failing)
the source raises NvmlUnavailable with a one-line reason.
"""

from __future__ import annotations

import ctypes
import logging
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from laggard.collectors.attribution import Attribution
from laggard.collectors.base import Clock, FixedRateScheduler, Source, SystemClock, Tick, build_node_sample, short_model

try:
    import pynvml
except ImportError:  # nvidia-ml-py is a dependency; this covers a broken install
    pynvml = None

log = logging.getLogger("laggard.collectors")

MIB = 1024 * 1024


class NvmlUnavailable(RuntimeError):
    """NVML cannot be used on this machine; the message is one line saying why."""


@dataclass
class Device:
    index: int
    handle: Any
    uuid: str
    model: str
    energy_supported: bool = True


class NvmlSource(Source):
    """All GPUs of this machine, one NodeSample per tick."""

    name = "nvml"

    def __init__(
        self,
        *,
        cluster: str,
        node: str | None = None,
        interval_s: float = 1.0,
        slow_interval_s: float = 10.0,
        attribution: Attribution | None = None,
        clock: Clock | None = None,
    ) -> None:
        super().__init__()
        self.cluster = cluster
        self.node = node or socket.gethostname()
        self.attribution = attribution or Attribution()
        self.scheduler = FixedRateScheduler(interval_s, clock or SystemClock())
        self.slow_every = max(1, round(slow_interval_s / interval_s))
        self._initialized = False
        self._xid_events: Any | None = None
        self._open()

    @property
    def missed_ticks(self) -> int:
        return self.scheduler.missed

    def _open(self) -> None:
        if pynvml is None:
            raise NvmlUnavailable("NVML unavailable: the nvidia-ml-py package (pynvml) is not installed")
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as err:
            reason = f"NVML unavailable: {err} (is the NVIDIA driver installed on this machine?)"
            raise NvmlUnavailable(reason) from None
        self._initialized = True
        try:
            self.devices = [self._device(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except pynvml.NVMLError as err:
            self.close()
            raise NvmlUnavailable(f"NVML could not list the GPUs: {err}") from None
        if not self.devices:
            self.close()
            raise NvmlUnavailable("NVML found no GPUs on this machine")
        self._reasons: Callable[[Any], int] = pynvml.nvmlDeviceGetCurrentClocksEventReasons
        self._xid_events = self._open_xid_events()

    @staticmethod
    def _device(index: int) -> Device:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(handle)
        return Device(index, handle, pynvml.nvmlDeviceGetUUID(handle), short_model(name))

    def _open_xid_events(self) -> Any | None:
        xid = pynvml.nvmlEventTypeXidCriticalError
        try:
            events = pynvml.nvmlEventSetCreate()
        except pynvml.NVMLError as err:
            log.info("nvml: XID events unavailable (%s); xid is left out", err)
            return None
        registered = 0
        for dev in self.devices:
            try:
                if pynvml.nvmlDeviceGetSupportedEventTypes(dev.handle) & xid:
                    pynvml.nvmlDeviceRegisterEvents(dev.handle, xid, events)
                    registered += 1
            except pynvml.NVMLError as err:
                log.info("nvml: no XID events for GPU %d (%s)", dev.index, err)
        if registered:
            return events
        pynvml.nvmlEventSetFree(events)
        return None

    def close(self) -> None:
        """Free the event set and shut NVML down; safe to call twice."""
        if not self._initialized:
            return
        self._initialized = False
        if self._xid_events is not None:
            pynvml.nvmlEventSetFree(self._xid_events)
        pynvml.nvmlShutdown()

    def _poll_xids(self) -> dict[int, int]:
        """GPU index -> last XID raised since the previous poll; never blocks."""
        found: dict[int, int] = {}
        while self._xid_events is not None:
            try:
                data = pynvml.nvmlEventSetWait(self._xid_events, 0)
            except pynvml.NVMLError_Timeout:
                break
            except pynvml.NVMLError as err:
                log.warning("nvml: reading XID events failed: %s", err)
                break
            if data.eventType == pynvml.nvmlEventTypeXidCriticalError:
                index = self._index_of(data.device)
                if index is None:
                    log.warning("nvml: XID %d on a GPU whose index cannot be read", int(data.eventData))
                else:
                    found[index] = int(data.eventData)
        return found

    def _index_of(self, handle: Any) -> int | None:
        """The GPU's index; from the handles read at start when NVML cannot say (a GPU that fell off
        the bus raises the XID that matters most, and then answers nothing)."""
        try:
            return pynvml.nvmlDeviceGetIndex(handle)
        except pynvml.NVMLError:
            address = ctypes.cast(handle, ctypes.c_void_p).value
            return next((d.index for d in self.devices
                         if ctypes.cast(d.handle, ctypes.c_void_p).value == address), None)

    def _clocks_event_reasons(self, handle: Any) -> int:
        try:
            return self._reasons(handle)
        except pynvml.NVMLError_FunctionNotFound:  # drivers before 535 only have the old name
            self._reasons = pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
            return self._reasons(handle)

    def read_gpu(self, dev: Device, slow: bool) -> dict[str, Any]:
        """The raw GpuSample fields of one GPU (fast counters; energy too when `slow`)."""
        h = dev.handle
        util = pynvml.nvmlDeviceGetUtilizationRates(h)
        memory = pynvml.nvmlDeviceGetMemoryInfo(h)
        fields: dict[str, Any] = {
            "index": dev.index,
            "uuid": dev.uuid,
            "model": dev.model,
            "util_gpu": util.gpu,
            "util_mem": util.memory,
            "power_w": pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
            "power_limit_w": pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0,
            "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
            "mem_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
            "temp_c": pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
            "mem_used_mib": memory.used / MIB,
            "mem_total_mib": memory.total / MIB,
            "clocks_event_reasons": self._clocks_event_reasons(h),
        }
        if slow and dev.energy_supported:
            try:
                fields["energy_j"] = pynvml.nvmlDeviceGetTotalEnergyConsumption(h) / 1000.0
            except pynvml.NVMLError_NotSupported:
                dev.energy_supported = False
        return fields

    def read_tick(self, slow: bool) -> Tick:
        """One NodeSample of every GPU that answered; a GPU whose read fails is counted and skipped."""
        ts = time.time()
        xids = self._poll_xids()
        gpus = []
        for dev in self.devices:
            try:
                fields = self.read_gpu(dev, slow)
            except pynvml.NVMLError as err:
                self.rejects.count(f"nvml:{type(err).__name__}", f"node {self.node} gpu {dev.index}", str(err))
                continue
            if dev.index in xids:
                fields["xid"] = xids[dev.index]
            gpus.append(fields | self.attribution.fields(dev.index, dev.uuid))
        sample = build_node_sample(self.rejects, ts=ts, cluster=self.cluster, node=self.node, gpus=gpus)
        return [sample] if sample else []

    def ticks(self) -> Iterator[Tick]:
        next_slow = 0
        try:
            for k in self.scheduler:
                slow = k >= next_slow
                if slow:
                    next_slow = k + self.slow_every
                yield self.read_tick(slow)
        finally:
            self.close()
