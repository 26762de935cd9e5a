"""Which faiss is installed, and whether its GPU index may be trusted (ask/knn/faiss_build.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from ask.knn import IndexSettings, ReferenceStore, faiss_build
from ask.knn.faiss_build import faiss_distributions, gpu_index_problem, probe_problem
from tests.conftest import run_cli


def test_exactly_one_faiss_build_is_installed() -> None:
    (build,) = faiss_distributions()
    assert build == "faiss-cpu" or build.startswith("faiss-gpu"), build


def test_a_self_test_that_passes_is_no_problem() -> None:
    assert probe_problem("import sys; assert sys.argv[1] == '3'", 3) is None


def test_a_self_test_that_aborts_like_a_missing_kernel_is_named_by_its_signal() -> None:
    code = "import os, sys; print('Faiss assertion failed: no kernel image', file=sys.stderr, flush=True); os.abort()"
    assert probe_problem(code, 0) == "its self-test was killed by SIGABRT: Faiss assertion failed: no kernel image"


def test_a_self_test_that_fails_or_hangs_says_so() -> None:
    failed = probe_problem("import sys; print('a'); print('neighbours differ', file=sys.stderr); sys.exit(3)", 0)
    assert failed == "its self-test failed (exit status 3): neighbours differ"
    assert probe_problem("import time; time.sleep(60)", 0, timeout_s=1) == "its self-test did not finish within 1 s"


def test_the_real_self_test_refuses_a_build_without_gpu_support() -> None:
    if hasattr(faiss_build.faiss, "StandardGpuResources") and torch.cuda.is_available():
        pytest.skip("a GPU build on a GPU machine: the self-test may pass")
    problem = probe_problem(faiss_build.GPU_SELF_TEST, 0)
    assert problem is not None and "AttributeError" in problem and "gpu" in problem, problem


@pytest.fixture
def fresh_probe():
    gpu_index_problem.cache_clear()
    yield
    gpu_index_problem.cache_clear()


def test_gpu_searches_fall_back_to_the_cpu_index_when_the_self_test_fails(
        monkeypatch: pytest.MonkeyPatch, fresh_probe: None, caplog: pytest.LogCaptureFixture) -> None:
    faiss = faiss_build.faiss
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    calls = []
    monkeypatch.setattr(faiss_build, "probe_problem",
                        lambda code, device: calls.append(device) or "its self-test was killed by SIGABRT")
    features = torch.randn(30, 4)
    store = ReferenceStore(["f"], "cosine", 3, torch.arange(30) % 3, {"f": features})
    with caplog.at_level(logging.WARNING, logger="ask.knn.faiss_build"):
        assert store.indexes.gpu_device(torch.device("cuda", 1)) is None
        assert store.indexes.gpu_device(torch.device("cuda", 1)) is None
    assert calls == [1]  # tested once per process and device
    (warning,) = [r.getMessage() for r in caplog.records if "not usable" in r.getMessage()]
    assert "cuda:1" in warning and "SIGABRT" in warning and "knn.use_gpu=false" in warning
    # The searches themselves still answer, from the CPU index.
    _, positions = store.indexes.index_for("f", None, torch.device("cpu"), 3).search(
        np.ascontiguousarray(torch.nn.functional.normalize(features[:2], dim=1).numpy()), 1)
    assert positions[:, 0].tolist() == [0, 1]


def test_a_gpu_index_that_passed_its_self_test_is_used(monkeypatch: pytest.MonkeyPatch, fresh_probe: None) -> None:
    faiss = faiss_build.faiss
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss_build, "probe_problem", lambda code, device: None)
    store = ReferenceStore(["f"], "cosine", 3, torch.arange(30) % 3, {"f": torch.randn(30, 4)})
    assert store.indexes.gpu_device(torch.device("cuda", 0)) == 0
    on_the_host = ReferenceStore(["f"], "cosine", 3, torch.arange(30) % 3, {"f": torch.randn(30, 4)},
                                 settings=IndexSettings(use_gpu=False))
    assert on_the_host.indexes.gpu_device(torch.device("cuda", 0)) is None


def test_two_faiss_builds_and_a_cuda_mismatch_are_each_said_once(
        monkeypatch: pytest.MonkeyPatch, fresh_probe: None, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(faiss_build, "faiss_distributions", lambda: ["faiss-cpu", "faiss-gpu-cu12"])
    monkeypatch.setattr(faiss_build, "probe_problem", lambda code, device: None)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with caplog.at_level(logging.WARNING, logger="ask.knn.faiss_build"):
        assert gpu_index_problem(0) is None
        assert gpu_index_problem(0) is None
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "several faiss builds are installed (faiss-cpu, faiss-gpu-cu12)" in messages[0]
    assert "pip uninstall -y faiss-cpu faiss-gpu-cu12" in messages[0]
    assert "faiss-gpu-cu12 is built for CUDA 12 and torch for CUDA 13" in messages[1]


def test_without_faiss_the_command_says_which_extra_to_install(tmp_path: Path, shared_cache: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    shadow = tmp_path / "no-faiss" / "faiss"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'faiss'\")\n")
    monkeypatch.setenv("PYTHONPATH", f"{shadow.parent}:{Path(__file__).parents[1]}")
    done = run_cli("ask-attack", ["progress=false", "hydra.run.dir=run"], tmp_path, shared_cache)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == ["ask-attack: error: faiss is not installed; install ask with one of its faiss extras: "
                     "pip install 'ask-knn[cpu]' (faiss-cpu) or 'ask-knn[gpu]' (faiss-gpu-cu12; README, 'GPU')"]
    assert not (tmp_path / "run" / "metrics.json").exists()
