"""What is measured: a training workload, validated when it is made."""
from __future__ import annotations

from dataclasses import asdict, dataclass

PRECISIONS = {
    "fp32": "full precision, no autocast",
    "fp16": "AMP: autocast to float16 with a gradient scaler (YOLO's default)",
    "bf16": "AMP: autocast to bfloat16, no scaler",
}
OPTIMIZERS = ("SGD", "AdamW")


class SpecError(ValueError):
    """Bad input: the message names the value, the constraint and the fix."""


def check_fraction(fraction, name: str = "fraction") -> float:
    """``fraction`` as a float in (0, 1]; SpecError naming ``name`` (e.g. "--fraction") otherwise."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise SpecError(f"{name}={fraction!r} must be in (0, 1]: the share of the card's memory to use, e.g. 0.8")
    return float(fraction)


@dataclass(frozen=True)
class Workload:
    """One training configuration whose memory is measured."""

    model: str
    """Model source: ``torchvision:NAME``, ``timm:NAME``, ``ultralytics:FILE.yaml`` or ``package.module:callable``."""
    imgsz: int = 640
    """Square input size in pixels; a multiple of the model's stride where it has one."""
    precision: str = "fp16"
    """fp32, fp16 (AMP + grad scaler, YOLO's default) or bf16 (AMP)."""
    optimizer: str = "SGD"
    """SGD (momentum 0.937, nesterov: YOLO's default) or AdamW; both keep state per parameter."""
    ema: bool = True
    """Keep an EMA copy of the weights, as YOLO trainers do (+1 copy of the weights)."""
    cudnn_benchmark: bool = False
    """Profile with torch.backends.cudnn.benchmark as the trainer will run it (real GPUs only)."""

    def __post_init__(self):
        if not isinstance(self.model, str) or ":" not in self.model or not all(self.model.split(":", 1)):
            raise SpecError(
                f"model={self.model!r} must be SOURCE:NAME, e.g. torchvision:resnet50, "
                "timm:convnext_tiny, ultralytics:yolov8s.yaml or my_pkg.models:build"
            )
        if isinstance(self.imgsz, bool) or not isinstance(self.imgsz, int) or self.imgsz <= 0:
            raise SpecError(f"imgsz={self.imgsz!r} must be a positive integer number of pixels, e.g. 640")
        if self.precision not in PRECISIONS:
            raise SpecError(f"precision={self.precision!r} must be one of {', '.join(PRECISIONS)}")
        if self.optimizer not in OPTIMIZERS:
            raise SpecError(f"optimizer={self.optimizer!r} must be one of {', '.join(OPTIMIZERS)}")

    def as_dict(self) -> dict:
        return asdict(self)

    def label(self) -> str:
        return f"{self.model}@{self.imgsz} {self.precision} {self.optimizer}{' ema' if self.ema else ''}"
