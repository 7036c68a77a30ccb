"""The cluster: joining a Ray cluster or starting a local one, which device actors its resources call
for (``resolve_devices``), and shutting a local Ray down so that no signal cuts it short."""
from __future__ import annotations

import collections
import os
import signal
import socket
import threading
from dataclasses import dataclass, field

import ray

from . import catalog
from .errors import SpecError


@dataclass(frozen=True)
class DeviceSpec:
    """One device actor to start: its simulated card (None: a real GPU), its Ray actor options, and how
    many devices of the fleet it stands for (a simulated card type's count; 1 for a real GPU)."""

    card: str | None
    options: dict = field(default_factory=dict)
    count: int = 1


RAY_QUIET = {"log_to_driver": False, "logging_level": "error"}


def connect(fleet, simulated_gpus: int) -> bool:
    """Join the configured cluster or start a local Ray; True when this call started it."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = fleet.address or os.environ.get("RAY_ADDRESS", "")
    # ray.init installs its own SIGTERM handler (exit 1); keep the caller's
    previous = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    if address:
        _check_reachable(address)
    try:
        if address:
            ray.init(address=address, **RAY_QUIET)
        else:
            ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False,
                     num_gpus=simulated_gpus or None, **RAY_QUIET)
    except ConnectionError as e:
        raise SpecError(f"address={address!r}: cannot reach a Ray cluster ({e}); "
                        "check `ray status` there, or leave --address empty to run locally") from None
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
    return True


def local_simulated_gpus(fleet) -> int:
    """Logical GPUs for a local Ray: one per simulated card type when the fleet will be simulated (each
    type's actor asks for one, whatever its count), else 0 (Ray counts the real GPUs itself)."""
    from .cuda import cuda_count

    remote = fleet.address or os.environ.get("RAY_ADDRESS")
    simulate = fleet.mode == "simulate" or (fleet.mode == "auto" and not remote and cuda_count() == 0)
    return len(simulated_counts(fleet)) if simulate else 0


def simulated_counts(fleet) -> dict[str, int]:
    """The simulated fleet as catalog card -> count, a card named twice counted once with both counts."""
    counts: dict[str, int] = collections.Counter()
    for key, n in fleet.simulate:
        counts[key] += n
    return dict(counts)


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not minutes, when HOST:PORT does not answer (Ray itself retries for long)."""
    if address == "auto":
        return  # Ray looks for a local cluster and says so quickly when there is none
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise SpecError(f"address={address!r} must be auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise SpecError(f"address={address!r}: nothing answers there ({e}); check `ray status` on the head "
                        "node, or leave --address empty to run locally") from None


def resolve_devices(fleet) -> tuple[list[DeviceSpec], bool]:
    """The device actors to start, and simulated? A real GPU gets one actor each; a simulated card type
    one actor whatever its count (identical simulated cards give identical answers), the count as data."""
    mode = fleet.mode
    if mode == "auto":
        if fleet.address or os.environ.get("RAY_ADDRESS"):
            mode = "real" if ray.cluster_resources().get("GPU", 0) >= 1 else "simulate"
        else:
            from .cuda import cuda_count

            mode = "real" if cuda_count() else "simulate"
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if mode == "real":
        if gpus < 1:
            raise SpecError("the Ray cluster has no GPUs: start it with GPUs, or use a simulated fleet "
                            "(--simulate 'T4, A100-80GB')")
        return [DeviceSpec(None) for _ in range(gpus)], False
    counts = simulated_counts(fleet)
    if len(counts) > gpus:
        raise SpecError(f"--simulate asks for {len(counts)} card types (one actor on one GPU each) but the Ray "
                        f"cluster has {gpus} GPUs (logical GPUs count): simulate fewer card types or add GPUs "
                        "to the cluster")
    out = []
    for key, count in counts.items():
        rt = catalog.card(key).ray_type
        # pin to nodes labelled with this accelerator type, where the cluster has such labels
        opts = {"resources": {f"accelerator_type:{rt}": 0.001}} if rt and f"accelerator_type:{rt}" in resources else {}
        out.append(DeviceSpec(key, opts, count))
    return out, True


def shutdown_ray() -> None:
    """ray.shutdown() that a second Ctrl-C or SIGTERM cannot cut short (it would leave Ray running)."""
    if threading.current_thread() is not threading.main_thread():
        ray.shutdown()
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        ray.shutdown()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
