"""Linux /proc/self/status readers (memory high-water marks for the guards and the fresh-process memory probe)."""
from __future__ import annotations


def status_bytes(field: str) -> int | None:
    """The `field` line of /proc/self/status (e.g. VmHWM, VmData) in bytes, None where /proc is not readable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
