"""What the benchmark reports say about the machine they ran on."""
from __future__ import annotations

import platform


def cpu_name() -> str:
    """The CPU's model name with its family and model numbers, from ``/proc/cpuinfo``.

    The numbers tell two hosts apart where a hypervisor shortens the name ("AMD EPYC"): per-call
    figures differ between hosts by more than this machine's noise. Elsewhere, ``platform``'s name.

    >>> cpu_name()   # doctest: +SKIP
    'AMD EPYC (family 25, model 17)'
    """
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name
