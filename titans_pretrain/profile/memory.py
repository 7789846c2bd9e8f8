"""Peak memory of the timed steps: CUDA max allocated, or the process's peak RSS on CPU.

On Linux, writing 5 to /proc/self/clear_refs resets the peak RSS (VmHWM), so the CPU figure
covers the timed steps and not the model build; where that fails, the lifetime peak is reported
and the kind says so."""
from __future__ import annotations

import resource

import torch


class PeakMemory:
    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "rss_peak"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.kind = "rss_peak_lifetime"

    def peak(self) -> tuple[int, str]:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device)), self.kind
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024, self.kind
        except OSError:
            pass
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "rss_peak_lifetime"
