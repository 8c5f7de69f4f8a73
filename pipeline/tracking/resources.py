"""Resident memory of this process, for the per-job `rss_mb` / `peak_rss_mb` metrics.

On Linux the peak is reset at the start of each job (`/proc/self/clear_refs`), so a sweep's jobs
each report their own peak; elsewhere `peak_rss_mb` is the process's peak so far.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")


def reset_peak() -> None:
    """Start measuring the peak afresh (Linux; a no-op where the kernel does not allow it)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def memory_mb() -> dict[str, float]:
    """{"rss_mb": resident now, "peak_rss_mb": the peak since reset_peak()} in MiB."""
    try:
        fields = dict(line.split(":", 1) for line in _STATUS.read_text().splitlines() if ":" in line)
        return {
            "rss_mb": int(fields["VmRSS"].split()[0]) / 1024,
            "peak_rss_mb": int(fields["VmHWM"].split()[0]) / 1024,
        }
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        peak_mb = peak / 2**20 if sys.platform == "darwin" else peak / 1024
        return {"rss_mb": peak_mb, "peak_rss_mb": peak_mb}
