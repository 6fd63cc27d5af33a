"""Peak-memory measurement for the benchmark scripts: RSS sampled in a thread on the CPU, allocator peaks on CUDA."""

from __future__ import annotations

import resource
import threading
import time

import torch

__all__ = ["PeakMemory", "rss_mib", "sync"]


def rss_mib() -> float:
    """Resident set size of this process now, in MiB (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def sync(device: torch.device | str) -> None:
    """Wait for queued CUDA work so that wall-clock timings are complete."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Context manager measuring the peak memory of the code inside it.

    On CUDA: ``torch.cuda.max_memory_allocated`` after a reset (``peak_mib``) and its rise over the memory allocated
    on entry (``delta_mib``). On the CPU: the process RSS sampled every millisecond by a thread (torch releases the
    GIL in its kernels, so the sampler runs during them), its peak and its rise over the RSS on entry. The CPU number
    includes memory the allocator keeps from earlier work, so compare rows measured in the same way.

    Args:
        device: the device the measured code runs on.
        interval: CPU sampling interval in seconds.
    """

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.001) -> None:
        self.device, self.interval = torch.device(device), interval
        self.peak_mib = self.delta_mib = self.base_mib = 0.0
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak_mib = max(self.peak_mib, rss_mib())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_mib = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self.base_mib = self.peak_mib = rss_mib()
            self._done.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._done.set()
            self._thread.join()
            self.peak_mib = max(self.peak_mib, rss_mib())
        self.delta_mib = self.peak_mib - self.base_mib
