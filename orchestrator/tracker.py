"""What a training step allocates and frees, op by op: a ``TorchDispatchMode`` that sees every tensor storage
created (and, through a weakref finalizer, freed), on fake tensors or real ones, as a list of events that
``allocator.replay`` turns into peak reserved bytes. With ``cuda_costs`` it also records what CUDA kernels
allocate inside ops (``cudacost``)."""
from __future__ import annotations

import contextlib
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from . import cudacost, fastfake


class StorageTracker(TorchDispatchMode):
    """Records storage allocations (size) and frees (index) in order, and phase marks (0)."""

    def __init__(self, fake: FakeTensorMode | None = None, cache: fastfake.OutputCache | None = None,
                 cuda_costs: bool = False):
        super().__init__()
        self.cuda_costs = cuda_costs  # add what CUDA kernels allocate inside an op (``cudacost.transients``)
        self.cublas: set[str] = set()  # cuBLAS handles the step used (``cudacost.cublas_context``)
        self.fake = fake  # the FakeTensorMode below, for ``cache``'s outputs (None: a real run, and no cache)
        # outputs of ops seen before, built from their metadata; with it, ops that cannot allocate are not run
        self.cache = cache
        self.events: list[int] = []  # size > 0: allocation; -(i + 1): free of allocation i; 0: phase mark
        self._live: dict[int, int] = {}  # id(storage) -> allocation index
        self._ignored: set[int] = set()  # id(storage) of stand-ins for tensors already counted
        self._count = 0
        self._paused = False

    @contextlib.contextmanager
    def untracked(self):
        """Ops inside create storages that are not recorded (and never freed in the trace)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def mark(self) -> None:
        self.events.append(0)

    @property
    def allocations(self) -> int:
        return self._count

    def local(self, start: int, first: int) -> list[int] | None:
        """Events since ``events[start]`` with allocation indices counted from ``first`` (the allocations
        made by then); None unless they free only what they allocated and leave nothing alive."""
        allocated = 0
        local_events = []
        freed = set()
        for ev in self.events[start:]:
            if ev > 0:
                local_events.append(ev)
                allocated += 1
            elif ev < 0:
                i = -ev - 1 - first
                if i < 0:
                    return None  # frees something from before the loss
                freed.add(i)
                local_events.append(-(i + 1))
            else:
                return None
        return local_events if len(freed) == allocated else None

    def replay(self, events: list[int]) -> None:
        """Append ``local``'s events as if they had happened again now."""
        first = self._count
        for ev in events:
            if ev > 0:
                self.events.append(ev)
                self._count += 1
            else:
                self.events.append(-(first + (-ev - 1) + 1))

    def ignore(self, t: torch.Tensor) -> None:
        """Never record ``t``'s storage (nor views of it): it stands in for a tensor already counted."""
        s = t.untyped_storage()
        self._ignored.add(id(s))
        weakref.finalize(s, self._ignored.discard, id(s))

    def track(self, t) -> None:
        if not isinstance(t, torch.Tensor):
            return
        s = t.untyped_storage()
        nbytes = s.nbytes()
        if nbytes == 0 or id(s) in self._live or id(s) in self._ignored:
            return
        index = self._count
        self._count += 1
        self._live[id(s)] = index
        self.events.append(nbytes)
        weakref.finalize(s, self._free, id(s), index)

    def _free(self, key: int, index: int) -> None:
        if self._live.get(key) == index:
            del self._live[key]
            self.events.append(-(index + 1))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.cache is not None and func in _NOTHING_TO_ALLOCATE and _no_data(args[0]):
            return None  # an in-place foreach op (the optimizer's, the EMA's) on fake tensors: no data, no storage
        if func is _DEVICE:
            return func(*args)
        key = self.cache.key(func, args, kwargs) if self.cache is not None else None
        out = fastfake.MISS if key is None else self.cache.lookup(key, self.fake)
        if out is fastfake.MISS:
            out = func(*args, **(kwargs or {}))
            if key is not None:
                self.cache.remember(key, args, kwargs, out)
        if self._paused:
            return out
        # a view allocates nothing, also where its base was never recorded (the criterion's own tensors);
        # but a composite "view" op (aten.to, reshape, contiguous under inference_mode) may copy
        view = getattr(func, "is_view", False) and func is not _LIFT_FRESH
        shared = fastfake.storages((args, kwargs)) if view else ()
        for t in tree_flatten(out)[0] if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and id(t.untyped_storage()) not in shared:
                self.track(t)
        if self.cuda_costs:
            self.transient(cudacost.transients(func, args))
            if func in cudacost.CUBLAS_OPS:
                self.cublas.add(cudacost.cublas_context())
        return out

    def transient(self, sizes: list[int]) -> None:
        """Blocks allocated together and freed at once inside one op (a CUDA kernel's copies and workspace)."""
        first = self._count
        for size in sizes:
            self.events.append(size)
            self._count += 1
        for i in range(first, self._count):
            self.events.append(-(i + 1))


def _in_place_foreach_ops() -> frozenset:
    """Every overload of torch's in-place foreach ops (``_foreach_add_``, ...): they return nothing and write
    into existing storages, so on fake tensors running them does nothing but cost a dispatch (hashing
    every tensor in the lists: a sixth of a YOLO trace before they were skipped)."""
    ops = set()
    for schema in torch._C._jit_get_all_schemas():
        name = schema.name.removeprefix("aten::")
        if name.startswith("_foreach_") and name.endswith("_") and not schema.returns:
            ops.add(getattr(getattr(torch.ops.aten, name), schema.overload_name or "default"))
    return frozenset(ops)


_NOTHING_TO_ALLOCATE = _in_place_foreach_ops()
_DEVICE = torch.ops.prim.device.default  # asked of fake tensors all the time; never a storage
_LIFT_FRESH = torch.ops.aten.lift_fresh.default  # "a view" of ``torch.tensor``'s new data: an allocation


def _no_data(tensors) -> bool:
    """Fake tensors without a value: not real ones (the spliced loss), nor the scalars whose value fake
    tensors do keep (an optimizer's step counts, which ``.item()`` reads)."""
    return bool(tensors) and all(isinstance(t, FakeTensor) and t.constant is None for t in tensors)
