"""This process's peak resident memory, for the memory probes that run in a fresh process.

Linux's VmHWM is the high-water RSS; writing 5 to /proc/self/clear_refs resets it to the
current RSS (refused on some kernels, where the probes fall back to a 1 ms sampler).
"""

import re


def vm_hwm() -> int:
    """The high-water RSS since the process started (or the last reset), bytes."""
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
