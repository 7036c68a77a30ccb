"""A shortcut for fake-tensor ops that a trace has already seen: their outputs' metadata, remembered.

A profile traces the same training step several times (each step twice, and each
shape of step at the same batch sizes), so most ops recur with the same input
metadata. ``FakeTensorMode`` caches them too, but its cache key (every argument
flattened and described, generically) and its output construction cost about 110 us
an op: over half of a trace. ``OutputCache`` keys on what decides an output's
metadata here (the op, each fake input's shape, strides, offset, dtype and device,
the other arguments) and builds the outputs straight from meta tensors.

Only ops whose outputs are all fresh tensors are cached (no views or aliases of
an input, no shared storage), and only when every tensor argument is a fake tensor
without a value (``FakeTensor.constant``: those ops compute): an in-place write
into such an argument (batch norm's running statistics) changes nothing a trace
can see. The first call of each key runs ``FakeTensorMode`` as usual and is
checked before it is remembered; anything else (an argument that cannot be keyed,
an op outside the rule) simply takes the usual path. ``tests/test_simulated.py``
checks that traces are identical with and without it.
"""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._pytree import tree_flatten, tree_unflatten

MISS = object()  # not in the cache: run the op as usual, then ``remember``

_aten = torch.ops.aten
BATCH_OPS = {  # op -> (arguments whose dim 0 is the batch, outputs whose dim 0 is the batch)
    _aten.native_batch_norm.default: ((0,), (0,)),
    _aten.native_batch_norm_backward.default: ((0, 1), (0,)),
    _aten.silu_backward.default: ((0, 1), (0,)),
    _aten.convolution.default: ((0,), (0,)),
    _aten.convolution_backward.default: ((0, 1), (0,)),
}
"""Ops whose outputs depend on the batch only through dim 0 of those outputs: each sample is computed
alike (convolution, SiLU's gradient), or the batch is reduced away (batch norm's statistics, the weights'
gradients). A first trace computes them (batch norm's fake implementation decomposes into some forty ops:
about 5 ms a call); later batches reuse that, with their own batch in dim 0. Not used at batch 1, so that
batch 1's own errors (batch norm over one value per channel) still surface."""

_UNCACHEABLE = None  # an entry for a key whose outputs broke the rule: always the usual path


def _cacheable_op(func) -> bool:
    """Outputs are tensors not declared to alias anything; no dynamic or data-dependent output shape."""
    if not isinstance(func, torch._ops.OpOverload) or func.is_view or func.namespace != "aten":
        return False  # (FakeTensorMode does not cache custom ops either: their fake kernels may hold state)
    schema = func._schema
    if not schema.returns or any(r.alias_info is not None for r in schema.returns):
        return False
    if not all(str(r.type) in ("Tensor", "Tensor[]") for r in schema.returns):
        return False
    bad = {torch.Tag.dynamic_output_shape, torch.Tag.data_dependent_output, torch.Tag.inplace_view}
    return not bad.intersection(func.tags)


class _NotKeyable(Exception):
    pass


def _key(value, fakes: list):
    """A hashable description of an argument; ``fakes`` gets one entry per fake tensor in it."""
    if isinstance(value, torch.Tensor):
        if type(value) is not FakeTensor or value.constant is not None or value.layout is not torch.strided:
            raise _NotKeyable
        fakes.append(True)
        return tuple(value.shape), value.stride(), value.storage_offset(), value.dtype, value.fake_device
    if isinstance(value, (list, tuple)):
        return tuple(_key(v, fakes) for v in value)
    if isinstance(value, (bool, int, float)):
        return type(value), value  # 1, 1.0 and True are equal keys, but promote differently
    if value is None or isinstance(value, (str, torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return value
    raise _NotKeyable


def storages(tree) -> set[int]:
    """``id`` of the storage of every tensor in ``tree`` (an op's arguments, say)."""
    return {id(t.untyped_storage()) for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)}


class OutputCache:
    """Output metadata of fake-tensor ops by input metadata, for the traces of one workload."""

    def __init__(self):
        self.entries: dict = {}
        self._ops: dict = {}  # OpOverload -> cacheable
        self.losses: dict = {}  # a spliced (real) loss's events by its inputs' shapes (``simulated._SplicedLoss``)
        self.hits = self.misses = 0

    def key(self, func, args, kwargs):
        """The key of this call, or None when it is not cached (take the usual path, don't remember)."""
        ok = self._ops.get(func)
        if ok is None:
            ok = self._ops[func] = _cacheable_op(func)
        if not ok:
            return None
        fakes: list = []
        try:
            key = (func, _key(args, fakes), _key(tuple(sorted(kwargs.items())), fakes) if kwargs else (),
                   torch.get_default_dtype())  # what some ops on integer tensors return
        except _NotKeyable:
            return None
        # a factory op (no tensor argument) may run outside FakeTensorMode (the spliced loss's real tensors)
        return key if fakes else None

    def lookup(self, key, mode: FakeTensorMode):
        entry = self.entries.get(key, MISS)
        batch = None
        if entry is MISS and key[0] in BATCH_OPS:
            batch, general = _batch_key(key)
            if batch is not None and batch > 1:
                entry = self.entries.get(general, MISS)
        if entry is MISS or entry is _UNCACHEABLE:
            return MISS
        self.hits += 1
        leaves, spec = entry
        outs = []
        with torch._C._DisableTorchDispatch():  # a meta tensor of that metadata, not a fake op
            for shape, stride, dtype, device in leaves:
                size = (batch, *shape[1:]) if shape and shape[0] is None else shape
                outs.append(FakeTensor(mode, torch.empty_strided(size, stride, dtype=dtype, device="meta"), device))
        return tree_unflatten(outs, spec)

    def remember(self, key, args, kwargs, out) -> None:
        """Record ``out``'s metadata for ``key`` when it keeps the rule (fresh, distinct, whole storages)."""
        self.misses += 1
        leaves, spec = tree_flatten(out)
        inputs = storages((args, kwargs))
        seen, meta = set(), []
        for t in leaves:
            if type(t) is not FakeTensor or t.constant is not None or t.layout is not torch.strided:
                self.entries[key] = _UNCACHEABLE
                return
            s = t.untyped_storage()
            with torch._C._DisableTorchDispatch():
                whole = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
            if (id(s) in inputs or id(s) in seen or t.storage_offset() != 0 or t.requires_grad
                    or s.nbytes() != whole.untyped_storage().nbytes()):
                self.entries[key] = _UNCACHEABLE
                return
            seen.add(id(s))
            meta.append((tuple(t.shape), t.stride(), t.dtype, t.fake_device))
        self.entries[key] = (meta, spec)
        if key[0] in BATCH_OPS:
            batch, general = _batch_key(key)
            outputs = BATCH_OPS[key[0]][1]
            if batch is not None and all(i < len(meta) and _batch_outermost(meta[i][0], meta[i][1], batch)
                                         for i in outputs):
                self.entries[general] = ([((None, *m[0][1:]), *m[1:]) if i in outputs else m
                                          for i, m in enumerate(meta)], spec)


def _batch_outermost(shape: tuple, stride: tuple, batch: int) -> bool:
    """``shape[0]`` is ``batch`` and the tensor is dense with dim 0 outermost: no stride involves the batch."""
    if len(shape) < 2 or shape[0] != batch:
        return False
    inner = 1
    for n in shape[1:]:
        inner *= n
    return stride[0] == inner and all(s <= inner for s in stride[1:])


def _batch_key(key) -> tuple[int | None, tuple | None]:
    """(the batch, ``key`` without it) for an op of ``BATCH_OPS``; (None, None) where its batch arguments
    disagree or their layout involves the batch."""
    func, args, kwargs, default_dtype = key
    positions = BATCH_OPS[func][0]
    batch = None
    general = list(args)
    for i in positions:
        if i >= len(args) or args[i] is None or not isinstance(args[i][0], tuple):
            return None, None
        shape, stride, *rest = args[i]
        if batch is None:
            batch = shape[0]
        if not _batch_outermost(shape, stride, batch):
            return None, None
        general[i] = ((None, *shape[1:]), stride, *rest)
    return batch, (func, "any batch", tuple(general), kwargs, default_dtype)
