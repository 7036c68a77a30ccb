"""What is measured: a training workload, declared once.

Each field of ``Workload`` is declared here, once, with its help text and its
metadata; everything else is derived from ``dataclasses.fields(Workload)``: the
table key (``table.KEY``), the job file's ``[sweep]`` keys (``job.py``), the flags
of ``sweep``, ``autobatch`` and ``lookup`` (``cli.add_workload_flags``), the lookup filter
(``answers.workload_rows``) and the pivot's row labels (``summary.pivot``).

Adding a field: declare it here, use it where the step is built or run
(``models.py``/``step.py``), and say what it means in the README.
"""
from __future__ import annotations

import numbers
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields

from . import families
from .allocconf import canonical, parse_conf
from .errors import SpecError

PRECISIONS = {
    "fp32": "full precision, no autocast",
    "fp16": "AMP: autocast to float16 with a gradient scaler (YOLO's default)",
    "bf16": "AMP: autocast to bfloat16, no scaler",
    "bf16-pure": "bfloat16 weights, gradients and optimizer state, no autocast (a model loaded in bfloat16; hf only)",
}
PURE = {"bf16-pure": "hf"}
"""Precisions whose weights are built in that dtype, by the family that can build them so."""
OPTIMIZERS = ("SGD", "AdamW")


def check_fraction(fraction, name: str = "fraction") -> float:
    """``fraction`` as a float in (0, 1]; SpecError naming ``name`` (e.g. "--fraction") otherwise."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise SpecError(f"{name}={fraction!r} must be in (0, 1]: the share of the card's memory to use, e.g. 0.8")
    return float(fraction)


def check_max_batch(max_batch, name: str = "max_batch") -> int:
    """``max_batch`` as a positive int; SpecError naming ``name`` (e.g. "--max-batch") otherwise."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise SpecError(f"{name}={max_batch!r} must be >= 1: the largest batch ever answered, e.g. 1024")
    return max_batch


def knob(default=MISSING, *, help: str, choices=None, minimum: int | None = None, maximum: int | None = None,
         over: str = "", grid: bool = False, size: bool = False, families: tuple[str, ...] = (), strict: bool = True,
         legacy=MISSING):
    """A workload field with what the rest of the code derives from it.

    ``help``: one line for flags and docs. ``choices``: allowed values. ``minimum``,
    ``maximum``: for ints, ``over`` saying why a value above ``maximum`` is a mistake
    (checked before anything is built: a huge value would be allocated). ``grid``: swept through ``[[sweep.grid]]`` cross products (model, imgsz)
    rather than as a ``[sweep]`` key of its own. ``size``: a family's size axis (``families.Family.size``;
    implies ``grid``): 0 in a workload of any other family. ``families``: the model families
    (``families.names()``) the field applies to (empty: all); ``strict``: another family's workload must leave
    it at its default (False: any value is kept, as tables written before families recorded it for every
    model). ``legacy``: what rows of a table written before the field existed were measured with (default:
    ``default``).
    """
    meta = {"help": help, "choices": tuple(choices) if choices else None, "minimum": minimum, "maximum": maximum,
            "over": over, "grid": grid or size, "size": size, "strict": strict,
            "families": families, "legacy": default if legacy is MISSING else legacy}
    return field(default=default, metadata=meta)


DEFAULT_OBJECTS = 400
"""Most boxes on one training image when no data set is named: ultralytics' AutoBatch rule
(4 x the most labels on one image, for mosaic) for COCO-like data, whose busiest images
carry about 100 labels. Name your ``data`` yaml to measure with your own data's figure."""
MAX_CLASSES = 100_000
"""More classes than any public data set has (ImageNet-21k: 21,843): a larger ``classes`` is a typo, and the
model would be built with it in host memory first (resnet18's head alone: 2 KiB per class)."""
MAX_OBJECTS = 10_000
"""4 x 2,500 boxes on one image, beyond the densest detection data sets (SKU-110K: about 700): a larger
``objects`` is a typo, and YOLO's loss runs on real host tensors of (batch x objects x anchors)."""


ATTENTIONS = ("sdpa", "eager")
MAX_LORA_RANK = 4096
"""Wider than the hidden size of the models people fine-tune with LoRA (8B: 4096): a larger rank is a typo."""
MAX_SEQ_LEN = 1 << 20
"""1M tokens per sample: beyond any model's context window; a larger ``seq_len`` is a typo."""


@dataclass(frozen=True, kw_only=True)
class Workload:
    """One training configuration whose memory is measured. Keyword-only: fields can be added safely."""

    model: str = knob(help=f"model source: {families.sources_text()}", grid=True)
    imgsz: int = knob(640, help="square input size in pixels; a multiple of the model's stride where it has one "
                                "(default 640, YOLO's)", minimum=1, size=True)
    seq_len: int = knob(2048, help="tokens per sample, every sample padded to it (language models, hf:NAME; "
                                   "default 2048)", minimum=1, maximum=MAX_SEQ_LEN,
                        over="longer than any model's context", size=True, legacy=0)
    precision: str = knob("fp16", help="fp16: AMP with grad scaler (YOLO's default); bf16: AMP; fp32: no autocast; "
                                       "bf16-pure: bfloat16 weights and optimizer state (hf only)",
                          choices=PRECISIONS)
    optimizer: str = knob("SGD", help="SGD keeps 1 state tensor per weight (YOLO's default), AdamW 2",
                          choices=OPTIMIZERS)
    ema: bool = knob(True, help="keep an EMA copy of the weights, as YOLO trainers do (+1 copy of the weights)")
    cudnn_benchmark: bool = knob(False, help="profile with torch.backends.cudnn.benchmark as your trainer sets it "
                                             "(real GPUs only)")
    deterministic: bool = knob(True, help="train as YOLO's deterministic=True does (its default): deterministic "
                                          "algorithms, cudnn.deterministic, CUBLAS_WORKSPACE_CONFIG=:4096:8; "
                                          "measured on real GPUs only (the simulated step's memory is the same "
                                          "either way)", legacy=False)
    classes: int = knob(0, help="class count: YOLO's nc, a classifier's outputs; 0 = the model's own (80 for "
                                "YOLO yamls, 1000 for torchvision/timm)", minimum=0, maximum=MAX_CLASSES,
                        over="more classes than any data set has: ImageNet-21k has 21843")
    objects: int = knob(DEFAULT_OBJECTS, help="most boxes on one training image after augmentation (YOLO only; "
                                              f"default {DEFAULT_OBJECTS}: 4 x ~100 for mosaic on COCO-like data; "
                                              "a data yaml gives 4 x its own most)", minimum=1,
                        maximum=MAX_OBJECTS, over="4 x 2500 boxes on one image, more than any data set has",
                        families=("ultralytics",), strict=False, legacy=8)
    nbs: int = knob(64, help="nominal batch: gradients accumulate over round(nbs / batch) steps, alive through "
                             "the next forward (YOLO's 64; 1 = no accumulation)", minimum=1, legacy=1)
    val_scale: int = knob(2, help="validation pass of the EMA weights at val_scale x batch, no grad, with the "
                                  "training state alive (YOLO's 2; 0 = no validation)", minimum=0, legacy=0)
    world_size: int = knob(1, help="ranks of a DistributedDataParallel job (1 = no DDP): each rank keeps the "
                                   "reducer's copy of the gradients and NCCL's buffers, which grow with ranks; "
                                   "the answer is the batch per rank", minimum=1)
    checkpointing: bool = knob(False, help="gradient checkpointing: each layer's activations recomputed in the "
                                           "backward instead of kept (language models, hf:NAME)", families=("hf",))
    lora_rank: int = knob(0, help="LoRA adapters of this rank on every linear layer but the output head, the base "
                                  "weights frozen: no gradients or optimizer state for them (0 = full "
                                  "fine-tuning; language models, needs peft)", minimum=0, maximum=MAX_LORA_RANK,
                          over="a rank above any model's width", families=("hf",))
    lora_targets: str = knob("all-linear", help="the modules LoRA adapts: all-linear (every linear layer but the "
                                                "output head) or module names, comma-separated (q_proj,v_proj)",
                             families=("hf",))
    attention: str = knob("sdpa", help="the attention implementation: sdpa (PyTorch's fused kernels, as a CUDA "
                                       "card picks them) or eager (the attention weights kept; language models)",
                          choices=ATTENTIONS, families=("hf",))
    alloc_conf: str = knob("", help="PYTORCH_CUDA_ALLOC_CONF the trainer runs with: '' (or default) is PyTorch's "
                                    "default allocator; expandable_segments:True, max_split_size_mb:N (N >= 20), "
                                    "garbage_collection_threshold:T (0 < T < 1), comma-separated; kept with its "
                                    "keys sorted", legacy="")

    def __post_init__(self):
        check_model(self.model)
        axis = families.family_of(self.model).size
        for name in SIZES:  # another family's size axis: 0 (left at its default, or read as 0 from a table)
            if name != axis:
                value = getattr(self, name)
                if value != 0 and value != DEFAULTS[name]:
                    raise _not_its_size(name, value, self.model)
                object.__setattr__(self, name, 0)
        for f in fields(self):  # numpy scalars (a row read from the table) become Python values
            if not (f.metadata["size"] and f.name != axis):
                object.__setattr__(self, f.name, check_value(f.name, getattr(self, f.name)))
        family = families.family_of(self.model).name
        if self.precision in PURE and family != PURE[self.precision]:
            raise SpecError(f"precision={self.precision!r} builds the weights in bfloat16, which only "
                            f"{PURE[self.precision]} models do; use bf16 (autocast) for {self.model}")
        for f in FIELDS:  # a field of other families only: at its default
            value = getattr(self, f.name)
            if not applies(f.name, self.model) and value != f.default:
                raise SpecError(f"{f.name}={value!r} does not apply to {self.model}: only to "
                                f"{', '.join(f.metadata['families'])} models; leave it out")

    @property
    def size_axis(self) -> str:
        """The workload field that sizes this model's samples (its family's: ``imgsz`` for images)."""
        return families.family_of(self.model).size

    @property
    def size(self) -> int:
        """The size of one sample on this model's size axis (``imgsz`` for images)."""
        return getattr(self, self.size_axis)

    def as_dict(self) -> dict:
        return asdict(self)

    def label(self) -> str:
        """``model@imgsz`` and every other field that is not at its default, e.g. ``m@640 fp16 SGD ema``."""
        text = f"{at(self.model, self.size)} {self.precision} {self.optimizer}{' ema' if self.ema else ''}"
        family = families.family_of(self.model).name
        extra = [show(k, getattr(self, k)) for k in KEYS if k not in _LABELLED
                 and (getattr(self, k) != default(k, self.model) or family in _BY_NAME[k].metadata["families"])]
        return " ".join([text] + extra)


FIELDS = fields(Workload)
KEYS = tuple(f.name for f in FIELDS)
"""The workload's part of the table key, in declaration order."""
AXES = tuple(f.name for f in FIELDS if not f.metadata["grid"])
"""Fields swept as ``[sweep]`` keys of their own (one value or a list); model and the sizes come from the grid."""
SIZES = tuple(f.name for f in FIELDS if f.metadata["size"])
"""The families' size axes (``imgsz``, ...): a workload has its family's, the others are 0."""
TYPES: dict[str, type] = {k: v for k, v in typing.get_type_hints(Workload).items() if k in KEYS}
DEFAULTS = {f.name: f.default for f in FIELDS if f.default is not MISSING}
LEGACY = {f.name: f.metadata["legacy"] for f in FIELDS if f.default is not MISSING}
"""What rows of a table that lacks a field's column were measured with."""
_BY_NAME = {f.name: f for f in FIELDS}
_LABELLED = ("model", *SIZES, "precision", "optimizer", "ema")  # always in a label


def _check_declarations() -> None:
    """Every family is sized by a declared size axis, and every ``families=`` names known families."""
    for fam in (*families.FAMILIES.values(), families.CALLABLE):
        if fam.size not in SIZES:
            raise TypeError(f"family {fam.name!r} is sized by {fam.size!r}, which is not a size axis of Workload "
                            f"({', '.join(SIZES)}): declare it with knob(..., size=True)")
        wrong = set(dict(fam.defaults)) - set(AXES)
        if wrong:
            raise TypeError(f"family {fam.name!r} sets defaults for {sorted(wrong)}, which are not workload fields "
                            f"swept as [sweep] keys ({', '.join(AXES)})")
    for f in FIELDS:
        unknown = set(f.metadata["families"]) - set(families.names())
        if unknown:
            raise TypeError(f"Workload.{f.name}: families={sorted(unknown)} are not families ({families.names()})")


_check_declarations()


def at(model: str, size: int) -> str:
    """``model@640`` (images), ``model@seq_len=512`` (another size axis): the model and the size of its samples."""
    axis = families.family_of(model).size
    return f"{model}@{size}" if axis == "imgsz" else f"{model}@{axis}={size}"


def check_model(model) -> str:
    if not isinstance(model, str) or ":" not in model or not all(model.split(":", 1)):
        raise SpecError(
            f"model={model!r} must be SOURCE:NAME, e.g. torchvision:resnet50, "
            "timm:convnext_tiny, ultralytics:yolov8s.yaml or my_pkg.models:build"
        )
    return model


def check_value(name: str, value, where: str = ""):
    """``value`` as the field's Python type if it is valid for workload field ``name``; SpecError
    starting with ``where`` (e.g. a file and section) otherwise."""
    meta, kind = _BY_NAME[name].metadata, TYPES[name]
    shown = f"{where}{name}={value!r}"
    is_bool = isinstance(value, bool) or getattr(getattr(value, "dtype", None), "kind", "") == "b"
    if kind is bool:
        if not is_bool:
            raise SpecError(f"{shown} must be a bool (true or false)")
        value = bool(value)
    elif kind is int:
        if is_bool or not isinstance(value, numbers.Integral):
            raise SpecError(f"{shown} must be an int")
        value = int(value)
        if meta["minimum"] is not None and value < meta["minimum"]:
            what = "a positive integer" if meta["minimum"] == 1 else f"an integer >= {meta['minimum']}"
            example = f", e.g. {DEFAULTS[name]}" if name in DEFAULTS else ""
            raise SpecError(f"{shown} must be {what}{example}")
        if meta["maximum"] is not None and value > meta["maximum"]:
            raise SpecError(f"{shown} must be at most {meta['maximum']} ({meta['over']}): give your data set's "
                            "figure, or read it from its yaml (--data, data =)")
    elif not isinstance(value, str):
        raise SpecError(f"{shown} must be a string")
    if meta["choices"] and value not in meta["choices"]:
        raise SpecError(f"{shown} must be one of {', '.join(meta['choices'])}")
    if name == "alloc_conf":
        value = check_alloc_conf(value, shown)
    return value


def check_alloc_conf(value: str, shown: str = "alloc_conf") -> str:
    """``value`` as its one canonical ``PYTORCH_CUDA_ALLOC_CONF`` string (``allocconf.canonical``: PyTorch's
    defaults left out, keys sorted; ``default`` is ``""``); SpecError starting with ``shown`` otherwise."""
    if value.strip() == "default":
        return ""
    try:
        return canonical(parse_conf(value))
    except ValueError as e:
        raise SpecError(f"{shown}: {e} ('' is PyTorch's default allocator)") from None


def make(where: str = "", **values) -> Workload:
    """``Workload(**values)``, each field not given (or None) at its default for the model's family
    (``default``); an unknown field name, or a size axis of another family, is a SpecError."""
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        raise SpecError(f"{where}unknown workload field {unknown[0]!r}; known: {', '.join(KEYS)}")
    values = {k: v for k, v in values.items() if v is not None}  # None: not given
    model = values.get("model")
    if not isinstance(model, str):
        return Workload(**values)
    axis = families.family_of(model).size
    for name in SIZES:
        if name != axis and values.get(name, 0) != 0:
            raise _not_its_size(name, values[name], model, where)
    return Workload(**families.defaults_of(model) | values)


def _not_its_size(name: str, value, model: str, where: str = "") -> SpecError:
    """The error for a size axis given to a model of another family."""
    axis = families.family_of(model).size
    return SpecError(f"{where}{name}={value!r} does not size {model}: its samples are sized by {axis}; "
                     f"give {axis} instead")


def default(name: str, model: str):
    """Field ``name``'s default for ``model``: its family's (``families.Family.defaults``), else the field's."""
    return families.defaults_of(model).get(name, DEFAULTS[name])


def applies(name: str, model: str) -> bool:
    """Whether workload field ``name`` may differ from its default for ``model`` (``knob(families=..., strict=...)``)."""
    meta = _BY_NAME[name].metadata
    return not (meta["families"] and meta["strict"]) or families.family_of(model).name in meta["families"]


def show(name: str, value) -> str:
    """A field's value for people: booleans by name (``ema``, ``no cudnn.benchmark``), others as text."""
    if TYPES.get(name) is bool:
        label = name.replace("_", ".")
        return label if value else f"no {label}"
    return f"{name} {value}" if TYPES.get(name) is int and name not in SIZES else str(value)
