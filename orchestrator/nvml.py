"""What the driver says about a device, outside torch: MIG slices (a slice is a device type of its own)
and NVML (the device's UUID, the processes beside ours and what they hold, the driver's version)."""
from __future__ import annotations

import functools
import os
import re

from .units import GiB

# -- MIG: a slice of a card is a device of its own

_MIG_NAME = re.compile(r"^(?P<card>.+?)\s+MIG\s+(?P<profile>(?:\d+c\.)?\d+g\.(?P<gb>\d+)gb(?:\+\w+)*)\s*$",
                       re.IGNORECASE)


def parse_mig(name: str) -> tuple[str, str, int] | None:
    """(card, profile, slice GB) for a MIG slice's device name, e.g. ``NVIDIA A100-SXM4-40GB MIG 3g.20gb``
    -> ``("NVIDIA A100-SXM4-40GB", "3g.20gb", 20)``; None for a whole card."""
    m = _MIG_NAME.match(name.strip())
    return (m["card"], m["profile"], int(m["gb"])) if m else None


def mig_profile(name: str, total_bytes: int) -> str:
    """The MIG profile of a device named ``name`` ("" for a whole card), checked against the memory the
    device reports: a slice must never be measured as the whole card; RuntimeError if it would be."""
    mig = parse_mig(name)
    if mig is None:
        return ""
    card, profile, gb = mig
    if total_bytes > 1.25 * gb * 1e9:  # "20gb" slices report about 19.6 GiB
        raise RuntimeError(
            f"{name!r} is a MIG {profile} slice of {card} but reports {total_bytes / GiB:.1f} GiB, the whole "
            f"card's memory: measuring it would answer for memory the slice does not have. Give each Ray "
            "worker one MIG device (CUDA_VISIBLE_DEVICES=MIG-<uuid>) or plan with a simulated fleet")
    return profile


# -- NVML: the driver's view of the device, by UUID (indices differ between NVML and CUDA_VISIBLE_DEVICES)

@functools.cache
def _nvml():
    """pynvml (nvidia-ml-py), initialised; None where there is no NVIDIA driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no driver, no library: NVML facts are reported as unknown
        return None
    return pynvml


def nvml_handle(uuid: str):
    """NVML's handle of the device with ``uuid`` (``GPU-...`` or ``MIG-...``), or None."""
    nvml = _nvml()
    if nvml is None or not uuid:
        return None
    try:
        return nvml.nvmlDeviceGetHandleByUUID(uuid)
    except Exception:
        return None


def nvml_uuid(props) -> str:
    """The NVML UUID of the CUDA device whose ``torch.cuda.get_device_properties`` are ``props``: torch gives
    the bare UUID; NVML prefixes ``GPU-`` for a card and ``MIG-`` for a MIG slice."""
    bare = str(getattr(props, "uuid", "") or "")
    if not bare:
        return ""
    candidates = ("MIG-", "GPU-") if parse_mig(props.name) else ("GPU-", "MIG-")
    known = [p + bare for p in candidates if nvml_handle(p + bare) is not None]
    return (known or [candidates[0] + bare])[0]


def neighbours(uuid: str, own_bytes: int) -> tuple[int, int] | None:
    """(count, bytes) of the other processes using the device ``uuid``, or None when NVML cannot say.

    This process is found by its PID; in a container with its own PID namespace NVML lists host PIDs,
    and this process is taken to be the one whose usage is closest above ``own_bytes`` (what our
    allocator reserves). A process whose usage NVML does not report counts with 0 bytes.
    """
    nvml, handle = _nvml(), nvml_handle(uuid)
    if handle is None:
        return None
    procs = {}
    for listing in (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetGraphicsRunningProcesses):
        try:
            procs.update({p.pid: p.usedGpuMemory or 0 for p in listing(handle)})
        except Exception:
            continue
    own = os.getpid()
    if own not in procs and procs:
        above = [pid for pid, used in procs.items() if used >= own_bytes] or list(procs)
        own = min(above, key=lambda pid: procs[pid] - own_bytes)
    others = [used for pid, used in procs.items() if pid != own]
    return len(others), sum(others)


def driver_version() -> str:
    """``550.54.15 (CUDA 12.4)``: the driver and the newest CUDA it supports; "" without NVML."""
    nvml = _nvml()
    if nvml is None:
        return ""
    try:
        version = nvml.nvmlSystemGetDriverVersion()
        version = version.decode() if isinstance(version, bytes) else version
        cuda = nvml.nvmlSystemGetCudaDriverVersion()
        return f"{version} (CUDA {cuda // 1000}.{cuda % 1000 // 10})"
    except Exception:  # informational only
        return ""
