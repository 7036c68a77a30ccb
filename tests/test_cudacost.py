"""What CUDA costs beyond the traced tensors (cudacost), and the calibration against real GPUs."""
import pytest
from torch import nn

from orchestrator import allocator, calibration, cudacost, models, simulated
from orchestrator.spec import Workload
from orchestrator.units import KiB, MiB


class ChunkConv(nn.Module):
    """A C2f-like block: a convolution fed by a chunk (a non-contiguous view), then a Linear (cuBLAS)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        y = self.b(self.a(x).chunk(2, 1)[1])
        return self.head(y.mean((2, 3)))


def chunk_conv():
    return ChunkConv()


class ConvOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.a(x).mean((2, 3))


def conv_only():
    return ConvOnly()


def _trace(source: str, batch: int = 4, deterministic: bool = True, cuda_costs: bool = True) -> list[int]:
    w = Workload(model=f"test_cudacost:{source}", imgsz=16, precision="fp32", ema=False, nbs=1, val_scale=0,
                 deterministic=deterministic)
    return simulated.trace(models.build(w), w, batch, cuda_costs=cuda_costs)


def _transient_pairs(events: list[int]) -> list[int]:
    """Sizes of allocations freed by the very next event (what ``tracker.StorageTracker.transient`` records)."""
    count, out = 0, []
    for i, ev in enumerate(events):
        if ev > 0:
            if i + 1 < len(events) and events[i + 1] == -(count + 1):
                out.append(ev)
            count += 1
    return out


def test_a_convolution_on_a_chunk_view_copies_it_for_cudnn_forward_and_backward():
    """The chunk of a (4, 8, 16, 16) fp32 map is (4, 4, 16, 16) non-contiguous: cuDNN gets a contiguous copy
    of it in the forward and of the saved input in the backward (4 x 4 x 16 x 16 x 4 B each); a CPU-checkable
    trace has none of it, and its tensors are otherwise the same."""
    chunk = 4 * 4 * 16 * 16 * 4
    with_costs, without = _trace("chunk_conv"), _trace("chunk_conv", cuda_costs=False)
    assert _transient_pairs(with_costs).count(chunk) >= 2
    assert chunk not in _transient_pairs(without)
    assert simulated.tensor_peak(with_costs) >= simulated.tensor_peak(without)


def test_each_cublas_handle_holds_its_workspace_from_the_start_of_the_trace():
    """A Linear runs cuBLAS in the forward and in the backward: two handles (the calling thread and the
    autograd engine's), each with a workspace that is never freed: 32 MiB under deterministic (ultralytics'
    ``:4096:8``), PyTorch's 8 MiB + 128 KiB default otherwise. A model without a matmul holds none."""
    for deterministic, size in ((True, 32 * MiB), (False, 8 * MiB + 128 * KiB)):
        events = _trace("chunk_conv", deterministic=deterministic)
        assert events[:2] == [size, size] and events[2] != size
        assert -1 not in events and -2 not in events  # never freed
    assert 32 * MiB not in _trace("conv_only")
    assert 32 * MiB not in _trace("chunk_conv", cuda_costs=False)


def test_cublas_workspace_sizes_follow_pytorchs_parse_of_the_config():
    assert cudacost.cublas_workspace_bytes(True, "2.5.1") == 32 * MiB
    assert cudacost.cublas_workspace_bytes(True, "2.0.1") == 4 * MiB  # the count was not multiplied before 2.1
    assert cudacost.cublas_workspace_bytes(False, "2.5.1", "8.6") == 4096 * KiB * 2 + 16 * KiB * 8
    assert cudacost.cublas_workspace_bytes(False, "2.5.1", "9.0") == 32 * MiB  # Hopper's default


def test_the_run_factor_only_adds_and_rows_say_how_far_the_simulator_was_off():
    for reserved in (0, 1, 10 * MiB, 7_123_456_789):
        assert reserved <= cudacost.over_a_run(reserved) <= reserved * calibration.HISTORY_FACTOR + 1024
    assert calibration.kind_of("ultralytics:yolo11s-seg.yaml") == "yolo-segment"
    assert calibration.kind_of("ultralytics:yolov8n.yaml") == "yolo-detect"
    assert calibration.kind_of("torchvision:resnet50") == "other"
    assert calibration.expected_error("torchvision:resnet50") == "unknown"
    assert calibration.expected_error("hf:llama-3.2-1b") == "-22%..+20%"  # benchmarks/llm_calibration.py's band
    lo, hi = calibration.EXPECTED_ERROR["yolo-detect"]
    assert lo <= 0 <= hi and calibration.expected_error("ultralytics:yolov8n.yaml").endswith("%")


@pytest.mark.slow
def test_profiles_with_cuda_costs_still_synthesize_exactly(profiles):
    """The copies and workspaces are affine in the batch like the tensors: synthesis stays exact."""
    w = Workload(model="ultralytics:yolov8n.yaml", imgsz=160, precision="fp16", objects=8, classes=3)
    prof = profiles(w)
    assert prof.cuda_costs and prof.affine
    direct = simulated.trace(models.build(w), w, 11, cuda_costs=True)
    assert prof.events(11) == direct
    bare = simulated.trace(models.build(w), w, 11)
    assert allocator.replay(direct).peak_reserved >= allocator.replay(bare).peak_reserved
    assert 32 * MiB in direct[:2]  # the loss's DFL decode is a matmul: cuBLAS in forward and backward
