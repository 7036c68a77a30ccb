"""The CUDA backend: a real device, measured with torch.cuda's allocator statistics while it runs the
trainer's step (``StepMeasurer``), with the trainer's process settings (``trainer_settings``); and what a
CUDA error means for the process (``device_fault``). Only this module touches ``torch.cuda``."""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
import time
import warnings
import weakref

import torch

from . import allocconf, catalog, ddp, models, step
from .devicetypes import DeviceInfo, Measurement, Measurer
from .errors import DeviceFault, OutOfMemory
from .nvml import driver_version, mig_profile, neighbours, nvml_uuid
from .spec import Workload

log = logging.getLogger(__name__)


_STICKY_MESSAGES = (
    "an illegal memory access was encountered", "device-side assert triggered", "unspecified launch failure",
    "an illegal instruction was encountered", "misaligned address", "invalid program counter",
    "hardware stack error", "the launch timed out and was terminated", "uncorrectable ecc error encountered",
    "operation not supported on global/shared address space",
)


def device_fault(exc: BaseException) -> DeviceFault | None:
    """``exc`` as a ``DeviceFault`` when it is a CUDA error that poisons the process's context
    (``torch.AcceleratorError`` other than out of memory, or one of CUDA's sticky messages), else None."""
    if isinstance(exc, DeviceFault):
        return exc
    if not isinstance(exc, RuntimeError) or step.oom_kind(exc) is not None:
        return None
    accelerator_error = getattr(torch, "AcceleratorError", ())
    text = str(exc).strip()
    if isinstance(exc, accelerator_error) or any(m in text.lower() for m in _STICKY_MESSAGES):
        return DeviceFault(f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}")
    return None



class CudaBackend:
    """A real CUDA device, measured with torch.cuda's allocator statistics."""

    def __init__(self, index: int | None = None):
        """``index`` None: this process's current device (``torch.cuda.current_device()``, which a
        launcher sets per rank), so that rank k measures its own card and leaves no context on GPU 0.
        RuntimeError without CUDA, or for a MIG slice that reports the whole card's memory."""
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available: use a simulated card (--gpu T4) or run on a GPU machine")
        torch.cuda.init()
        self.device = torch.device("cuda", torch.cuda.current_device() if index is None else index)
        props = torch.cuda.get_device_properties(self.device)
        self.uuid = nvml_uuid(props)
        self.mig = mig_profile(props.name, props.total_memory)
        if self.mig:
            log.info("%s (%s) is a MIG slice: measured as a device type of its own", props.name, self.uuid)

    def info(self) -> DeviceInfo:
        props = torch.cuda.get_device_properties(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        reserved = torch.cuda.memory_reserved(self.device)
        count, near_bytes = neighbours(self.uuid, reserved) or (0, 0)
        return DeviceInfo(
            name=props.name, total_bytes=total, outside_bytes=total - free - reserved, backend="cuda",
            capability=f"{props.major}.{props.minor}", driver=driver_version(), cuda=torch.version.cuda or "",
            torch=torch.__version__, host=socket.gethostname(),
            card=getattr(catalog.by_device_name(props.name, total), "key", ""),
            uuid=self.uuid, mig=self.mig, neighbours=count, neighbour_bytes=near_bytes,
        )

    def measurer(self, workload: Workload) -> Measurer:
        """Build the model on the device and run one unmeasured step at batch 1 (see ``StepMeasurer``).

        Under DDP (``world_size`` > 1) the step runs under the real DistributedDataParallel on a one-rank
        NCCL group (``one_rank_group``): the reducer's buckets are measured, and the communicator's own
        memory with them; the receive buffers for the other ranks, which one process cannot make, are
        added from the model (``other_ranks_bytes``, with the catalog's channels for this card)."""
        props = torch.cuda.get_device_properties(self.device)
        return step_measurer(self.device, workload, CudaCounters(self.device), props.name, props.total_memory)


def other_ranks_bytes(workload: Workload, name: str, total_bytes: int) -> int:
    """Device memory NCCL holds for the other ranks of ``workload``'s DDP job, which one process cannot make:
    their receive buffers (``ddp.peer_bytes``) with the catalog's channels for the card that reports ``name``
    and ``total_bytes`` (the catalog's most for a card it does not know); 0 without DDP."""
    if workload.world_size == 1:
        return 0
    card = catalog.by_device_name(name, total_bytes)
    return ddp.peer_bytes(workload.world_size, catalog.channels_for(card))


def step_measurer(device: torch.device, workload: Workload, counters, name: str, total_bytes: int) -> StepMeasurer:
    """The measurer of ``workload`` on the real ``device`` (a card reporting ``name`` and ``total_bytes``),
    reading ``counters`` (``CudaCounters`` on a GPU): under DDP, on the one-rank group (``one_rank_group``),
    with the other ranks' buffers (``other_ranks_bytes``) added to what the device shows. On a CUDA device the
    caching allocator runs with ``workload.alloc_conf`` while the measurer lives (``allocator_settings``)."""
    put_back = allocator_settings(workload.alloc_conf, device) if device.type == "cuda" else None
    try:
        if workload.world_size > 1:
            one_rank_group(device)
        m = StepMeasurer(device, workload, counters, extra_outside_bytes=other_ranks_bytes(workload, name, total_bytes))
    except BaseException:
        if put_back is not None:
            put_back()
        raise
    if put_back is not None:  # the process's own settings again once the measurer is gone (not at exit)
        weakref.finalize(m, put_back).atexit = False
    return m


def settings_text(alloc_conf: str) -> str:
    """What to hand PyTorch's allocator for ``alloc_conf`` (a canonical ``PYTORCH_CUDA_ALLOC_CONF``):
    expandable_segments always named, because each parse resets max_split_size_mb, roundup_power2_divisions
    and garbage_collection_threshold to their defaults but keeps expandable_segments as it was
    (c10/core/AllocatorConfig.cpp, ``parseArgs``)."""
    named = "expandable_segments" in alloc_conf
    return ",".join(p for p in ("" if named else "expandable_segments:False", alloc_conf) if p)


def _conf_of(text: str) -> allocconf.AllocConf | None:
    """The settings a ``PYTORCH_CUDA_ALLOC_CONF`` text makes; None for one the model cannot read (other keys)."""
    try:
        return allocconf.parse_conf(text)
    except ValueError:
        return None


def allocator_settings(alloc_conf: str, device: torch.device):
    """Make this process's caching allocator run with ``alloc_conf`` from here on, as a trainer started with
    ``PYTORCH_CUDA_ALLOC_CONF=<alloc_conf>`` does; a callable that puts the previous settings back, or None when
    nothing changed (the process already runs with them: a trainer measuring its own settings).

    PyTorch reads these settings at run time too (``torch._C._accelerator_setAllocatorSettings``, formerly
    ``torch.cuda.memory._set_allocator_settings``), but a change applies to blocks and segments made after
    it: segments made before stay as they were and keep serving requests (Note [Expandable Segments]:
    "Expandable blocks can be enabled/disabled throughout the run of a program"; ``get_free_block`` reuses
    free blocks of either kind). So a change is equivalent to a fresh process only when the allocator holds
    no segment: after freeing what this process can (garbage, cuBLAS's workspaces, the cache), a device on
    which memory is still reserved is refused (RuntimeError): measure that setting in a fresh process. The
    ``cudaMallocAsync`` backend is chosen once per process and has none of these settings."""
    get = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    current = get() if get is not None else (os.environ.get("PYTORCH_ALLOC_CONF")
                                             or os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""))
    if torch.cuda.get_allocator_backend() != "native":
        if alloc_conf:
            raise RuntimeError(f"alloc_conf={alloc_conf!r} is a setting of PyTorch's native caching allocator, and "
                               "this process runs cudaMallocAsync (PYTORCH_CUDA_ALLOC_CONF=backend:...): measure it "
                               "in a process without that backend")
        return None
    if _conf_of(current) == allocconf.parse_conf(alloc_conf):
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
        torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.empty_cache()
    held = torch.cuda.memory_reserved(device)
    if held:
        raise RuntimeError(
            f"alloc_conf={alloc_conf!r}: this process's allocator runs with {current!r} and still holds {held} B on "
            f"{device} in segments made with those settings, which PyTorch keeps using after a change; measure in "
            f"a fresh process started with PYTORCH_CUDA_ALLOC_CONF={settings_text(alloc_conf)!r}")
    log.info("allocator settings for the probes: %r (were %r)", settings_text(alloc_conf), current)
    _set_allocator_settings(settings_text(alloc_conf))
    before = settings_text(current)
    return lambda: _set_allocator_settings(before)


def _set_allocator_settings(text: str) -> None:
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if setter is None:
        torch.cuda.memory._set_allocator_settings(text)
    else:
        setter(text)


def one_rank_group(device: torch.device) -> None:
    """Make this process a one-rank DDP job on ``device`` (NCCL on CUDA, gloo on the CPU), once: the
    measured step then runs the real DistributedDataParallel. A process already in a job of several
    ranks is refused: every probe would be a collective the other ranks do not run."""
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError(
                f"this process is rank {dist.get_rank()} of a {dist.get_world_size()}-rank job: a DDP workload is "
                "measured on a one-rank group of its own; measure before init_process_group, or on a simulated "
                "card (gpu='T4')")
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                            device_id=device if device.type == "cuda" else None)


class CudaCounters:
    """The device's memory counters a ``StepMeasurer`` reads: torch.cuda's allocator statistics,
    ``mem_get_info`` and the allocator's count of failed allocations."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        """Free the cache (a probe starts from the allocator's lowest state) and reset the peaks."""
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)

    def reset_peaks(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peaks(self) -> tuple[int, int]:
        """(peak reserved, peak allocated) since the last reset, the device's work finished."""
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_reserved(self.device), torch.cuda.max_memory_allocated(self.device)

    def outside_bytes(self) -> int:
        """Device memory in use that our allocator did not reserve: the context, kernels, other processes."""
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free - torch.cuda.memory_reserved(self.device)

    def ooms(self) -> int:
        """Allocations the caching allocator has failed (raised out of memory for) in this process."""
        return torch.cuda.memory_stats(self.device).get("num_ooms", 0)

    def release(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()


DETERMINISTIC_CUBLAS = ":4096:8"
"""CUBLAS_WORKSPACE_CONFIG in YOLO's deterministic mode (ultralytics ``init_seeds``)."""


@contextlib.contextmanager
def trainer_settings(workload: Workload, device: torch.device):
    """The process-wide settings a trainer makes, as ``workload`` says, for one probe; the previous
    settings afterwards (``autobatch`` may run inside the trainer's own process).

    ``cudnn.benchmark``, and ultralytics' ``init_seeds(deterministic=...)``: with ``deterministic``,
    ``use_deterministic_algorithms(True, warn_only=True)``, ``cudnn.deterministic``, no NaN fill of new
    tensors and ``CUBLAS_WORKSPACE_CONFIG=:4096:8``; without it, none of these. cuBLAS's workspace size
    is read when torch gives a cuBLAS handle its workspace, and torch keeps workspaces for the life of
    the process: when the setting changes, the kept ones are dropped, so the probe's first matmul
    allocates the workload's own (inside the measured step, where the trainer has it too).
    """
    det = workload.deterministic
    fill = getattr(torch.utils, "deterministic", None)
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             getattr(fill, "fill_uninitialized_memory", None), os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    torch.backends.cudnn.benchmark = workload.cudnn_benchmark
    torch.backends.cudnn.deterministic = det
    torch.use_deterministic_algorithms(det, warn_only=True)
    if fill is not None:
        fill.fill_uninitialized_memory = not det
    _cublas_workspace_config(DETERMINISTIC_CUBLAS if det else None, device)

    def put_back():
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[0], saved[1]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])
        if fill is not None:
            fill.fill_uninitialized_memory = saved[4]
        _cublas_workspace_config(saved[5], device)

    with _cleanup_after(put_back), warnings.catch_warnings():
        # warn_only: each op without a deterministic kernel would warn, in every probe
        warnings.filterwarnings("ignore", message=".*does not have a deterministic implementation")
        yield


def _cublas_workspace_config(value: str | None, device: torch.device) -> None:
    """Set CUBLAS_WORKSPACE_CONFIG (None: unset); when it changes, drop torch's cuBLAS workspaces so that
    none is used with a size it was not allocated with."""
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") == value:
        return
    if value is None:
        del os.environ["CUBLAS_WORKSPACE_CONFIG"]
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = value
    if device.type == "cuda" and hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
        torch.cuda.synchronize(device)
        torch._C._cuda_clearCublasWorkspaces()


@contextlib.contextmanager
def _cleanup_after(cleanup):
    """Run ``cleanup()`` after the block. When the block raised, the block's error is the one that
    propagates: a sticky CUDA error fails any clean-up on the device too, and would hide the cause."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            cleanup()
        raise
    cleanup()


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the module's parameters and buffers on the host, to put back after each probe."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


@torch.no_grad()
def restore(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put ``state`` back into the module's own tensors (in place: nothing new is allocated)."""
    own = module.state_dict()
    for k, v in state.items():
        own[k].copy_(v)


class StepMeasurer:
    """Measures ``step.train`` on a real device with its memory counters (``CudaCounters`` on a GPU).

    Construction builds a fresh model, keeps a copy of its initial weights and buffers on the host,
    moves it to the device and runs one unmeasured step at batch 1 (kernels load, so the context
    grows before ``info()`` is read). Each probe then:

    - runs with the trainer's process settings (``trainer_settings``: cudnn.benchmark, determinism);
    - starts from the initial weights and puts them back afterwards, whatever happened: ~30 real
      optimizer steps on random data would otherwise move them (fp16 overflows, skipped steps);
    - raises ``OutOfMemory`` when the step ran out of memory, including out-of-memory that code
      inside the step caught and worked around (ultralytics' assigner retries image by image,
      cuDNN tries another plan): the allocator's failure count grew. With ``cudnn_benchmark`` the
      autotuner fails allocations on purpose: those are logged, not counted;
    - a cuDNN failure that may or may not be memory (``step.oom_kind`` "maybe") is out of memory
      when an allocation failed or the batch is above 1; at batch 1 it is tried once more with the
      cache emptied, and failing again it is an error, not ``no-fit``;
    - records memory outside the allocator afterwards (plus ``extra_outside_bytes``, what the process
      cannot see: NCCL's buffers for other ranks under DDP); ``outside_bytes`` keeps the most seen.
    """

    def __init__(self, device: torch.device, workload: Workload, counters: CudaCounters, extra_outside_bytes: int = 0):
        t0 = time.perf_counter()
        self.device, self.workload, self.counters = device, workload, counters
        # device memory outside the allocator that this process cannot see, added to every reading
        # (under DDP: NCCL's receive buffers for the other ranks)
        self.extra_outside_bytes = extra_outside_bytes
        self.built = models.on_device(models.build(workload), device, workload)  # real weights there (built there if meta)
        self.initial = snapshot(self.built.module)
        self.outside_bytes = 0
        self.caught_ooms = 0  # allocations that failed and were caught inside the step with cudnn.benchmark on
        try:
            self(1)
        except OutOfMemory:
            pass  # the decision's own batch-1 probe will say no-fit
        self.setup_seconds = time.perf_counter() - t0

    def __call__(self, batch: int) -> Measurement:
        with trainer_settings(self.workload, self.device):
            with _cleanup_after(self._settle):
                return self._probe(batch, again=batch == 1)

    def _settle(self) -> None:
        self.counters.release()
        self.outside_bytes = max(self.outside_bytes, self.counters.outside_bytes() + self.extra_outside_bytes)

    def _probe(self, batch: int, again: bool) -> Measurement:
        failed_before = self.counters.ooms()
        try:
            measured = self._step(batch)
        except Exception as e:
            kind = step.oom_kind(e)
            if kind is None:
                raise
            msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
        else:
            kind, msg = None, ""
        # from here on outside the except block: the traceback (and the tensors its frames hold) is gone
        caught = self.counters.ooms() - failed_before
        if kind is None:
            if caught and not self.workload.cudnn_benchmark:
                raise OutOfMemory(f"{caught} allocation(s) ran out of memory inside the step at batch {batch} "
                                  "and were caught by the code that made them (a fallback ran instead)")
            if caught:
                self.caught_ooms += caught
                log.info("%s at batch %d: %d allocations failed and were caught inside the step (cudnn.benchmark's "
                         "autotuner tries workspaces that do not fit): not counted", self.workload.label(), batch,
                         caught)
            return measured
        if kind == "maybe" and not caught and batch == 1:
            if again:
                self.counters.release()
                return self._probe(batch, again=False)
            raise RuntimeError(f"{msg} (again at batch 1 with the cache emptied, and no allocation failed: "
                               "an error of this model or library, not out of memory)")
        raise OutOfMemory(msg)

    def _step(self, batch: int) -> Measurement:
        c = self.counters
        c.reset()
        phases: list[tuple[int, int]] = []  # (reserved, allocated) peaks: training, validation, training, ...

        def mark():  # a phase ends (the cache was just emptied): keep its peaks, measure the next alone
            phases.append(c.peaks())
            c.reset_peaks()

        with _cleanup_after(lambda: restore(self.built.module, self.initial)):
            step.train(self.built, self.workload, batch, self.device, mark=mark, epochs=step.run_epochs(self.workload))
            phases.append(c.peaks())
            outside = c.outside_bytes() + self.extra_outside_bytes
        reserved, allocated = max(p[0] for p in phases), max(p[1] for p in phases)
        val = max((p[0] for p in phases[1::2]), default=0)
        return Measurement(reserved, allocated, outside, val)


def cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
