"""How a run sets up CUDA: float32 precision (TF32 off unless asked), cuDNN autotuning, pinned host
copies, and the feature-cache key that records the device and precision the features came from.

The flags are process-wide and readable without a GPU, so the CPU tests check what a CUDA run
would set; the gpu-marked ones check what the settings do on a real device.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ask.evaluation.job import run_attack_job
from ask.training.trainer import train
from ask.utils.runtime import configure_backends, float32_precision, to_device
from ask.wiring import feature_cache_key
from tests.conftest import compose_run

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def restore_backends():
    """configure_backends changes process-wide flags: put back what the rest of the session had."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


def _tf32_flags() -> tuple[bool, bool]:
    """(matmul, convolution) TF32 switches; reading them raises where the two APIs were mixed."""
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def test_float32_precision_is_tf32_only_on_cuda_and_only_when_asked() -> None:
    assert [float32_precision(device, tf32) for device in (CPU, CUDA) for tf32 in (False, True)] == [
        "ieee", "ieee", "ieee", "tf32"]
    assert float32_precision(torch.device("cuda:1"), True) == "tf32"


@pytest.mark.usefixtures("restore_backends")
def test_configure_backends_turns_tf32_off_and_autotunes_only_nondeterministic_cuda_runs() -> None:
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's own default for convolutions
    assert configure_backends(CUDA, deterministic=False, tf32=False) == "ieee"
    assert _tf32_flags() == (False, False) and torch.backends.cudnn.benchmark is True
    if hasattr(torch.backends.cudnn, "conv"):  # torch >= 2.9 also answers per operation
        assert torch.backends.cudnn.conv.fp32_precision != "tf32"
        assert torch.backends.cuda.matmul.fp32_precision != "tf32"
    assert configure_backends(CUDA, deterministic=True, tf32=True) == "tf32"
    assert _tf32_flags() == (True, True) and torch.backends.cudnn.benchmark is False
    # A CPU run leaves autotuning off and reports full float32 whatever tf32 says.
    assert configure_backends(CPU, deterministic=False, tf32=True) == "ieee"
    assert torch.backends.cudnn.benchmark is False


def test_feature_cache_key_follows_the_device_and_the_precision(cache_dir: Path) -> None:
    pool = torch.arange(50)

    def key(device: torch.device, overrides: list[str] = ()) -> dict:
        run = compose_run("attack", list(overrides), cache_dir)
        return feature_cache_key(run, "digest", ["block2"], pool, (1, 8, 8), device)

    cpu = key(CPU)
    assert cpu == key(CPU) and cpu["extra"]["device"] == "cpu" and cpu["extra"]["float32_precision"] == "ieee"
    # TF32 does not exist on the CPU: asking for it must not throw away a CPU cache.
    assert key(CPU, ["tf32=true"]) == cpu
    cuda, cuda_tf32 = key(CUDA), key(CUDA, ["tf32=true"])
    assert cuda == key(torch.device("cuda:1"))  # the type counts, not which GPU
    assert len({json.dumps(k, sort_keys=True) for k in (cpu, cuda, cuda_tf32)}) == 3
    assert cuda_tf32["extra"]["float32_precision"] == "tf32"


def test_an_evaluation_records_its_precision_and_keys_its_feature_cache_by_it(tmp_path: Path) -> None:
    tiny = ["dataset.train_per_class=20", "dataset.test_per_class=5", "train.batch_size=32", "model.width=8",
            "train.epochs=1", "train.schedule=constant"]
    cache = tmp_path / "cache"
    train(compose_run("train", tiny, cache), tmp_path / "model")
    run = compose_run("attack", [*tiny, f"model.checkpoint={tmp_path / 'model' / 'best.pt'}", "attack=[pgd]",
                                 "eval.victims=[knn]", "eval.n_points=10", "attack.steps=1"], cache)
    metrics = run_attack_job(run, tmp_path / "attack")
    assert metrics["device"] == "cpu" and metrics["float32_precision"] == "ieee"
    (meta,) = [json.loads(path.read_text()) for path in (cache / "features").glob("*/meta.json")]
    assert meta["key"]["extra"]["device"] == "cpu" and meta["key"]["extra"]["float32_precision"] == "ieee"


def test_to_device_on_the_cpu_is_the_batch_itself() -> None:
    batch = torch.arange(12, dtype=torch.uint8).reshape(3, 4)
    assert to_device(batch, CPU) is batch


# ------------------------------------------------------------------ GPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.usefixtures("restore_backends")
def test_tf32_off_keeps_cuda_convolutions_at_float32_accuracy() -> None:
    torch.manual_seed(0)
    x, weight = torch.randn(16, 64, 16, 16), torch.randn(128, 64, 3, 3)
    exact = F.conv2d(x.double(), weight.double(), padding=1)

    def relative_error(tf32: bool) -> float:
        configure_backends(CUDA, deterministic=True, tf32=tf32)
        out = F.conv2d(x.cuda(), weight.cuda(), padding=1).cpu().double()
        return float((out - exact).norm() / exact.norm())

    assert relative_error(False) < 5e-5  # rounding of float32 sums (about 1e-7), Winograd kernels included
    if torch.cuda.get_device_capability() >= (8, 0):  # TF32 exists from Ampere on
        assert relative_error(True) > 5e-5  # 10-bit mantissas: a few 1e-4


@pytest.mark.gpu
@needs_cuda
def test_to_device_copies_through_pinned_memory_to_the_gpu() -> None:
    batch = torch.randint(0, 255, (64, 3, 32, 32), dtype=torch.uint8)
    moved = to_device(batch, CUDA)
    assert moved.is_cuda and torch.equal(moved.cpu(), batch)
    assert to_device(moved, CUDA) is moved
