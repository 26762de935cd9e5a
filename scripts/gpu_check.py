"""The prepared GPU check: every CUDA path of the project in one run of under 8 minutes, one JSON.

Run it through ``scripts/gpu_check.sh``, which finds (or sets up) the Python environment. The
steps run in order, each in a process of its own under its own time limit, and the check stops
at the first that fails (``--keep-going`` runs the others anyway):

  environment   torch sees a CUDA device and faiss has GPU support
  gpu_tests     ``pytest -m gpu``: the gpu-marked tests, none failing and none skipped
  vgg16_epoch   one CIFAR-10 VGG16 epoch with mixed precision and channels_last (images/s)
  faiss         flat and IVF faiss GPU indexes over a 50,000-point pool against exact CPU search
  attacks       all six attacks on 500 CIFAR-10 points on the GPU, and on 50 points on the GPU
                and on the CPU, whose results must agree within a tolerance
  torchrun      ``ask-train`` under a one-GPU torchrun

The JSON (``--out``; else ``$OUT/gpu_check.json`` when ``$OUT`` is set; else ./gpu_check.json) is
rewritten after every step, so a run cut short still holds what it measured; each step's output
is in ``gpu_check_logs/`` beside it. ``--dry-run`` checks, on any machine, that what the steps
need is in place: the Python packages, the CLI overrides composing against ``conf/``, the ``gpu``
marker and its tests, the CIFAR-10 folder, the time budget; it lists the steps and runs none.

The CIFAR-10 ImageFolder tree is ``../shared/data/cifar10-jpeg`` from the repository root, or
``--cifar-root`` / ``$ASK_GPU_CHECK_CIFAR``.

One file of over 500 lines on purpose: the GPU machine gets one script to copy and run, and
``--dry-run`` must work before ``ask`` itself can be imported.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 480  # the whole check, setup of a missing environment aside
DEFAULT_CIFAR = REPO.parent / "shared" / "data" / "cifar10-jpeg"
MODULES = ("torch", "torchvision", "hydra", "omegaconf", "faiss", "numpy", "sklearn", "pytest")

# The GPU-against-CPU comparison: a small eps keeps robust accuracy away from 0 on a model trained
# for one epoch, so the two devices' numbers can disagree if a path is wrong; 10 steps keep the
# CPU's share (six attacks through VGG16 on 50 points) to about half a minute on 16 cores.
COMPARE_POINTS, GPU_POINTS = 50, 500
COMPARE_THREAT = ["attack.eps=2/255", "attack.step_size=1/510", "attack.steps=10"]
CLEAN_TOLERANCE = 1 / COMPARE_POINTS + 1e-9  # one point's clean prediction may flip on the boundary
ROBUST_TOLERANCE = 6 / COMPARE_POINTS + 1e-9  # per (attack, victim): random starts differ by device
MEAN_ROBUST_TOLERANCE = 0.05
FLAT_RECALL_MIN = 0.999


class CheckFailed(Exception):
    """A step ran but what it found is wrong; the message says what."""


@dataclass
class Context:
    python: str
    cifar: Path
    work: Path
    logs: Path

    @property
    def cache(self) -> Path:
        return self.work / "cache"

    def vgg16_checkpoint(self) -> Path:
        # Imported here: without ask, the dry run must still get as far as listing what is missing.
        from ask.utils.runfiles import BEST_CHECKPOINT

        return self.work / "vgg16_epoch" / BEST_CHECKPOINT


@dataclass
class Step:
    name: str
    timeout_s: int
    what: str
    command: Callable[[Context], list[str]]
    read: Callable[[Context, Path], dict[str, Any]]  # (context, log) -> results, or CheckFailed
    # (config name, overrides) the step's runs compose; --dry-run composes each against conf/.
    configs: Callable[[Context], list[tuple[str, list[str]]]] = field(default=lambda ctx: [])


# ------------------------------------------------------------------ what each step runs


def vgg16_overrides(ctx: Context) -> list[str]:
    return ["dataset=cifar10_folder", f"dataset.root={ctx.cifar}", "model=vgg16", "train.epochs=1",
            "train.amp=true", "train.channels_last=true", "train.val_points=0", "device=cuda", "progress=false"]


def torchrun_overrides(ctx: Context) -> list[str]:
    return ["dataset.train_per_class=50", "model.width=16", "train.epochs=1", "defense=at", "defense.steps=2",
            "device=cuda", "progress=false"]


def attack_overrides(ctx: Context, device: str, points: int) -> list[str]:
    """All six attacks (the default list) on the DNN, the kNN and the DkNN vote (no calibration split)."""
    return ["dataset=cifar10_folder", f"dataset.root={ctx.cifar}", "model=vgg16",
            f"model.checkpoint={ctx.vgg16_checkpoint()}", "knn.pool_per_class=100",
            "eval.victims=[dnn,knn,dknn_vote]", f"eval.n_points={points}", f"device={device}", "progress=false",
            *COMPARE_THREAT]


def attack_runs(ctx: Context) -> list[tuple[str, str, int]]:
    """(name, device, points) of the three evaluations the attacks step makes."""
    return [(f"gpu_{GPU_POINTS}", "cuda", GPU_POINTS), (f"gpu_{COMPARE_POINTS}", "cuda", COMPARE_POINTS),
            (f"cpu_{COMPARE_POINTS}", "cpu", COMPARE_POINTS)]


def _self(ctx: Context, step: str) -> list[str]:
    """This script run as a step of its own (results in the work directory, read back after)."""
    return [ctx.python, str(Path(__file__).resolve()), "--step", step, "--work", str(ctx.work),
            "--cifar-root", str(ctx.cifar)]


def _result(ctx: Context, step: str) -> Path:
    return ctx.work / f"{step}.json"


def _read_result(step: str) -> Callable[[Context, Path], dict[str, Any]]:
    def read(ctx: Context, log: Path) -> dict[str, Any]:
        path = _result(ctx, step)
        if not path.is_file():
            raise CheckFailed(f"the step wrote no {path.name}; see its log")
        found = json.loads(path.read_text())
        if found.get("problem"):
            raise CheckFailed(found["problem"])
        return found
    return read


def _read_gpu_tests(ctx: Context, log: Path) -> dict[str, Any]:
    xml_path = ctx.work / "gpu_tests.xml"
    if not xml_path.is_file():
        raise CheckFailed("pytest wrote no report; see its log")
    root = ElementTree.parse(xml_path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    outcome: dict[str, list[str]] = {"failed": [], "skipped": []}
    for case in suite.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome["failed"].append(name)
            elif child.tag == "skipped":
                outcome["skipped"].append(f"{name} ({child.get('message', '')})")
    results = {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
               **outcome}
    if outcome["failed"]:
        raise CheckFailed(f"{len(outcome['failed'])} gpu test(s) failed: {', '.join(outcome['failed'])}")
    if outcome["skipped"]:  # on a GPU machine a skip is a missing path (e.g. faiss without GPU support)
        raise CheckFailed(f"{len(outcome['skipped'])} gpu test(s) skipped: {'; '.join(outcome['skipped'])}")
    if results["passed"] == 0:
        raise CheckFailed("no gpu-marked test ran")
    return results


def _read_train_run(run_dir: Callable[[Context], Path], world_size: int) -> Callable[[Context, Path], dict[str, Any]]:
    def read(ctx: Context, log: Path) -> dict[str, Any]:
        from ask.utils.runfiles import EPOCH_METRICS_FILE, TRAIN_SUMMARY_FILE

        directory = run_dir(ctx)
        summary_path = directory / TRAIN_SUMMARY_FILE
        if not summary_path.is_file():
            raise CheckFailed(f"no {summary_path}; see the log")
        summary = json.loads(summary_path.read_text())
        record = json.loads((directory / EPOCH_METRICS_FILE).read_text().splitlines()[-1])
        if not math.isfinite(record["train_loss"]):
            raise CheckFailed(f"the training loss is {record['train_loss']}")
        if summary.get("world_size") != world_size:
            raise CheckFailed(f"world_size {summary.get('world_size')}, expected {world_size}")
        config = summary["config"]
        return {"images_per_second": record["images_per_second"], "epoch_seconds": record["seconds"],
                "train_loss": record["train_loss"], "train_acc": record["train_acc"], "test_acc": summary["test_acc"],
                "n_train": summary["n_train"], "world_size": summary["world_size"], "device": config["device"],
                "amp": config["train"].get("amp"), "channels_last": config["train"].get("channels_last"),
                "checkpoint": summary["checkpoint"]}
    return read


STEPS = [
    Step("environment", 20, "torch sees a CUDA device, faiss has GPU support",
         lambda ctx: _self(ctx, "environment"), _read_result("environment")),
    Step("gpu_tests", 120, "pytest -m gpu: every gpu-marked test passes, none is skipped",
         lambda ctx: [ctx.python, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
                      f"--junitxml={ctx.work / 'gpu_tests.xml'}"],
         _read_gpu_tests),
    Step("vgg16_epoch", 90, "one CIFAR-10 VGG16 epoch, mixed precision + channels_last (images/s)",
         lambda ctx: [ctx.python, "-m", "ask.cli.train", *vgg16_overrides(ctx),
                      f"hydra.run.dir={ctx.work / 'vgg16_epoch'}"],
         _read_train_run(lambda ctx: ctx.work / "vgg16_epoch", 1),
         lambda ctx: [("train", vgg16_overrides(ctx))]),
    Step("faiss", 50, "faiss GPU indexes over 50,000 points: recall against exact CPU search",
         lambda ctx: _self(ctx, "faiss"), _read_result("faiss")),
    Step("attacks", 140, f"six attacks on {GPU_POINTS} points on the GPU; GPU and CPU agree on {COMPARE_POINTS}",
         lambda ctx: _self(ctx, "attacks"), _read_result("attacks"),
         lambda ctx: [("attack", attack_overrides(ctx, device, points)) for _, device, points in attack_runs(ctx)]),
    Step("torchrun", 40, "ask-train under a one-GPU torchrun",
         lambda ctx: [ctx.python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                      "-m", "ask.cli.train", *torchrun_overrides(ctx), f"hydra.run.dir={ctx.work / 'torchrun'}"],
         _read_train_run(lambda ctx: ctx.work / "torchrun", 1),
         lambda ctx: [("train", torchrun_overrides(ctx))]),
]


# ------------------------------------------------------------------ the steps this script runs itself


def step_environment(ctx: Context) -> dict[str, Any]:
    import faiss
    import torch

    found: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__,
                             "torch_cuda": torch.version.cuda, "faiss": getattr(faiss, "__version__", "?"),
                             "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count(),
                             "load_average": list(os.getloadavg())}
    if not torch.cuda.is_available():
        return {**found, "problem": f"torch {torch.__version__} sees no CUDA device (a CPU build, or no driver)"}
    found.update(gpu=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                 gpu_count=torch.cuda.device_count(),
                 gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    gpus = faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0
    found["faiss_gpus"] = gpus
    if gpus == 0:
        return {**found, "problem": "faiss has no GPU support: install faiss-gpu-cu12 instead of faiss-cpu "
                                    "(scripts/gpu_check.sh does so in the repository's .venv)"}
    return found


def step_faiss(ctx: Context) -> dict[str, Any]:
    import torch

    from ask.knn import IndexSettings, ReferenceStore
    from ask.knn.indexes import recall_at_k
    from ask.knn.synthetic import LAYER, SyntheticPool

    pool = SyntheticPool(50_000, 512, 10, seed=0)
    queries = torch.from_numpy(pool.queries(1000))
    k = 10

    def store(**settings: Any) -> ReferenceStore:
        return ReferenceStore.from_chunks(pool.chunks(8192), pool.n, [LAYER], "cosine", pool.classes,
                                          settings=IndexSettings(**settings))

    exact = store(use_gpu=False)
    _, truth = exact.search(LAYER, queries, k)
    _, truth_per_class = exact.search_per_class(LAYER, queries, 5)
    found: dict[str, Any] = {"n": pool.n, "d": pool.d, "queries": len(queries), "k": k}
    problems = []
    for kind in ("flat", "ivf"):
        gpu_store = store(kind=kind, nprobe=32)
        start = time.perf_counter()
        _, rows = gpu_store.search(LAYER, queries.cuda(), k)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        index = gpu_store.indexes.cached.get((LAYER, None, torch.cuda.current_device()))
        entry = {"recall_at_k": recall_at_k(rows.cpu().numpy(), truth.numpy()), "first_search_s": round(seconds, 3),
                 "faiss_index": type(index).__name__, "host_copy_kept": (LAYER, None, None) in gpu_store.indexes.cached}
        if kind == "ivf":  # the same cells searched on the host: a GPU clone must probe as many
            entry["cpu_recall_at_k"] = store(kind=kind, nprobe=32, use_gpu=False).measure_recall(
                LAYER, k, queries=queries)["recall_at_k"]
        else:
            _, per_class = gpu_store.search_per_class(LAYER, queries.cuda(), 5)
            entry["per_class_agreement"] = float((per_class.cpu() == truth_per_class).float().mean())
        found[kind] = entry
        if not entry["faiss_index"].startswith("Gpu"):
            problems.append(f"the {kind} index searched CUDA queries on the host ({entry['faiss_index']})")
        if entry["host_copy_kept"]:
            problems.append(f"the {kind} GPU index kept its host copy")
    if found["flat"]["recall_at_k"] < FLAT_RECALL_MIN or found["flat"]["per_class_agreement"] < FLAT_RECALL_MIN:
        problems.append(f"exact GPU search disagrees with the CPU: recall {found['flat']['recall_at_k']:.4f}, "
                        f"per-class agreement {found['flat']['per_class_agreement']:.4f} (< {FLAT_RECALL_MIN})")
    if found["ivf"]["recall_at_k"] < found["ivf"]["cpu_recall_at_k"] - 0.02:
        problems.append(f"IVF on the GPU recalls {found['ivf']['recall_at_k']:.4f} against "
                        f"{found['ivf']['cpu_recall_at_k']:.4f} on the host (nprobe lost in the clone?)")
    return {**found, "problem": "; ".join(problems)}


def step_attacks(ctx: Context) -> dict[str, Any]:
    from ask.cli.attack import print_results
    from ask.evaluation.job import run_attack_job

    if not ctx.vgg16_checkpoint().is_file():
        return {"problem": f"no {ctx.vgg16_checkpoint()}: the vgg16_epoch step must run first"}
    metrics = {}
    for name, device, points in attack_runs(ctx):
        started = time.perf_counter()
        run, output_dir = compose("attack", attack_overrides(ctx, device, points), ctx.cache), ctx.work / f"attack_{name}"
        metrics[name] = run_attack_job(run, output_dir)
        print_results(run, metrics[name], output_dir)
        print(f"gpu_check: {name} took {time.perf_counter() - started:.1f} s", flush=True)
    gpu, cpu = metrics[f"gpu_{COMPARE_POINTS}"], metrics[f"cpu_{COMPARE_POINTS}"]
    rows = []
    for g, c in zip(gpu["results"], cpu["results"], strict=True):
        rows.append({"attack": g["attack"], "victim": g["victim"], "clean_gpu": g["clean_acc"],
                     "clean_cpu": c["clean_acc"], "robust_gpu": g["robust_acc"], "robust_cpu": c["robust_acc"]})
    gaps = [abs(r["robust_gpu"] - r["robust_cpu"]) for r in rows]
    problems = [f"{r['attack']} on {r['victim']}: clean accuracy {r['clean_gpu']:.2f} on the GPU, {r['clean_cpu']:.2f} "
                "on the CPU" for r in rows if abs(r["clean_gpu"] - r["clean_cpu"]) > CLEAN_TOLERANCE]
    problems += [f"{r['attack']} on {r['victim']}: robust accuracy {r['robust_gpu']:.2f} on the GPU, "
                 f"{r['robust_cpu']:.2f} on the CPU" for r, gap in zip(rows, gaps, strict=True) if gap > ROBUST_TOLERANCE]
    if sum(gaps) / len(gaps) > MEAN_ROBUST_TOLERANCE:
        problems.append(f"robust accuracy differs by {sum(gaps) / len(gaps):.3f} on average between GPU and CPU")
    full = metrics[f"gpu_{GPU_POINTS}"]
    speed = {r["attack"]: r.get("images_per_second") for r in full["results"] if r["victim"] == "knn"}
    informative = any(0 < r["robust_cpu"] < 1 for r in rows if r["attack"] != "any")
    return {"eps": gpu["eps"], "steps": gpu["steps"], "gpu_points": full["n_points"],
            "gpu_images_per_second_by_attack": speed, "gpu_float32_precision": full["float32_precision"],
            "compare_points": COMPARE_POINTS, "rows": rows, "max_robust_gap": max(gaps),
            "mean_robust_gap": sum(gaps) / len(gaps), "informative": informative,
            "tolerance": {"clean": CLEAN_TOLERANCE, "robust": ROBUST_TOLERANCE, "mean_robust": MEAN_ROBUST_TOLERANCE},
            "problem": "; ".join(problems)}


SELF_STEPS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "environment": step_environment, "faiss": step_faiss, "attacks": step_attacks}


def compose(config_name: str, overrides: list[str], cache: Path) -> Any:
    """The run config the console script would build from ``overrides`` (range checks included)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ask.config import config_dir, register_configs, resolve

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = hydra_compose(config_name, overrides=[f"cache_dir={cache}", *overrides])
    return resolve(cfg)


# ------------------------------------------------------------------ dry run


def check_overrides(config_name: str, overrides: list[str]) -> str | None:
    """Why ``overrides`` would not compose into a valid ``config_name`` run, or None."""
    try:
        compose(config_name, overrides, Path(tempfile.gettempdir()) / "gpu_check_dry_run")
    except Exception as error:  # Hydra's and the schema's errors alike: what the run would stop on
        return f"{config_name} {' '.join(overrides)}: {type(error).__name__}: {str(error).splitlines()[0]}"
    return None


def missing_pieces(ctx: Context, out: Path) -> list[str]:
    """Everything a real run needs that is not in place here, one line each (empty: ready)."""
    problems = []
    for module in (*MODULES, "torch.distributed.run", "ask.cli.train", "ask.cli.attack"):
        try:
            found = importlib.util.find_spec(module)
        except ModuleNotFoundError:
            found = None
        if found is None:
            problems.append(f"Python module {module} is not importable by {ctx.python}")
    if not problems:
        import ask

        if Path(ask.__file__).resolve().parents[1] != REPO:
            problems.append(f"ask is imported from {Path(ask.__file__).parent}, not from {REPO} (set PYTHONPATH)")
        for step in STEPS:
            for config_name, overrides in step.configs(ctx):
                problem = check_overrides(config_name, overrides)
                if problem:
                    problems.append(f"step {step.name}: {problem}")
        problems += _marker_problems(ctx)
    for split in ("train", "test"):
        if not (ctx.cifar / split).is_dir():
            problems.append(f"CIFAR-10 folder {ctx.cifar / split} does not exist (--cifar-root or ASK_GPU_CHECK_CIFAR)")
    if not os.access(_existing_parent(out), os.W_OK):
        problems.append(f"cannot write {out}")
    total = sum(step.timeout_s for step in STEPS)
    if total > BUDGET_S:
        problems.append(f"the steps' time limits add up to {total} s, over the {BUDGET_S} s budget")
    return problems


def _marker_problems(ctx: Context) -> list[str]:
    """The ``gpu`` marker is registered and selects at least one test."""
    pyproject = (REPO / "pyproject.toml").read_text()
    if '"gpu:' not in pyproject:
        return ["pyproject.toml registers no gpu marker"]
    done = subprocess.run([ctx.python, "-m", "pytest", "-m", "gpu", "--collect-only", "-q", "-p", "no:cacheprovider"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    collected = [line for line in done.stdout.splitlines() if "::" in line]
    if done.returncode != 0 or not collected:
        return [f"pytest -m gpu collects no test (exit {done.returncode}): {done.stdout.strip()[-300:]}"]
    return []


def _existing_parent(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


# ------------------------------------------------------------------ the run


def run_step(step: Step, ctx: Context) -> dict[str, Any]:
    """Run one step under its time limit (its whole process group is stopped at the limit)."""
    command = step.command(ctx)
    log = ctx.logs / f"{step.name}.log"
    entry: dict[str, Any] = {"name": step.name, "what": step.what, "timeout_s": step.timeout_s,
                             "command": " ".join(command), "log": str(log)}
    env = {**os.environ, "ASK_CACHE_DIR": str(ctx.cache), "HYDRA_FULL_ERROR": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("ASK_DEVICE", None)  # the steps name their devices; pytest's conftest pins its own
    started = time.monotonic()
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=step.timeout_s)
        except subprocess.TimeoutExpired:
            _stop_group(process)
            code = None
    entry["seconds"] = round(time.monotonic() - started, 1)
    if code is None:
        return {**entry, "status": "timeout", "error": f"still running after {step.timeout_s} s; stopped"}
    entry["exit_code"] = code
    try:
        entry["result"] = step.read(ctx, log)
    except CheckFailed as failed:
        return {**entry, "status": "failed", "error": str(failed)}
    except Exception as error:  # a result that cannot be read is a failure of the step, said as such
        return {**entry, "status": "failed", "error": f"{type(error).__name__}: {error}"}
    if code != 0:
        return {**entry, "status": "failed", "error": f"exit status {code}"}
    return {**entry, "status": "passed"}


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the step's process group (ask-train saves its step on it), SIGKILL after 10 s.

    Returns when no process of the group is left, not when its leader is: a torchrun worker or a
    data-loading child that outlives the leader would hold the GPU while the next step starts.
    """
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        while _group_alive(process.pid):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        else:
            return


def _group_alive(group: int) -> bool:
    """Whether a process of ``group`` still runs (a zombie waiting to be reaped does not count)."""
    stats = list(Path("/proc").glob("[0-9]*/stat"))
    if not stats:  # no /proc: the signal test, which counts zombies too
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in stats:
        try:
            state, _parent, process_group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue  # the process ended while it was being read
        if int(process_group) == group and state != "Z":
            return True
    return False


def _write(out: Path, report: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out)


def _commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    except OSError:  # no git on the machine: the JSON just lacks the commit
        return None
    return done.stdout.strip() or None


def run_all(ctx: Context, out: Path, keep_going: bool) -> int:
    report: dict[str, Any] = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "commit": _commit(), "work": str(ctx.work), "budget_s": BUDGET_S,
                              "status": "running", "failed_step": None, "steps": []}
    _write(out, report)
    failed = None
    for step in STEPS:
        if failed is not None and not keep_going:
            report["steps"].append({"name": step.name, "status": "not run", "error": f"{failed} failed first"})
            continue
        print(f"gpu_check: {step.name} ({step.what}; limit {step.timeout_s} s)", flush=True)
        entry = run_step(step, ctx)
        report["steps"].append(entry)
        if entry["status"] != "passed" and failed is None:
            failed = step.name
            report["failed_step"] = failed
            # Loud: the step, what went wrong, and the end of its output, on stderr.
            print(f"gpu_check: FAILED {step.name}: {entry['error']}", file=sys.stderr)
            print(_tail(Path(entry["log"])), file=sys.stderr)
        else:
            print(f"gpu_check: {step.name} {entry['status']} in {entry['seconds']} s", flush=True)
        _write(out, report)
    report["status"] = "failed" if failed else "passed"
    report["seconds"] = round(sum(s.get("seconds", 0) for s in report["steps"]), 1)
    _write(out, report)
    print(f"gpu_check: {report['status']} ({report['seconds']} s); wrote {out}", flush=True)
    return 1 if failed else 0


def _tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="check that every step can run; run none")
    parser.add_argument("--out", type=Path, help="the JSON (default: $OUT/gpu_check.json, else ./gpu_check.json)")
    parser.add_argument("--work", type=Path, help="runs, caches and checkpoints (default: a new temporary directory)")
    parser.add_argument("--cifar-root", type=Path, default=Path(os.environ.get("ASK_GPU_CHECK_CIFAR") or DEFAULT_CIFAR))
    parser.add_argument("--keep-going", action="store_true", help="run every step even after one failed")
    parser.add_argument("--step", choices=sorted(SELF_STEPS), help=argparse.SUPPRESS)  # one step, as a subprocess
    args = parser.parse_args(argv)

    default_out = Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else Path("gpu_check.json")
    out = (args.out or default_out).resolve()
    if args.work is None:  # a dry run only names where the runs would go
        args.work = Path(tempfile.gettempdir()) / "gpu_check-WORK" if args.dry_run else Path(
            tempfile.mkdtemp(prefix="gpu_check-"))
    work = args.work.resolve()
    ctx = Context(python=sys.executable, cifar=args.cifar_root.resolve(), work=work, logs=out.parent / "gpu_check_logs")
    if args.step:
        found = SELF_STEPS[args.step](ctx)
        _write(_result(ctx, args.step), found)
        return 0
    if args.dry_run:
        for step in STEPS:
            print(f"step {step.name:<12} limit {step.timeout_s:>4} s  {step.what}\n    {' '.join(step.command(ctx))}")
        print(f"time limits: {sum(s.timeout_s for s in STEPS)} s of a {BUDGET_S} s budget")
        problems = missing_pieces(ctx, out)
        for problem in problems:
            print(f"gpu_check: missing: {problem}", file=sys.stderr)
        if problems:
            return 1
        print("gpu_check: dry run: every step's modules, configs, gpu tests and data are in place")
        return 0
    ctx.work.mkdir(parents=True, exist_ok=True)
    ctx.logs.mkdir(parents=True, exist_ok=True)
    return run_all(ctx, out, args.keep_going)


if __name__ == "__main__":
    sys.exit(main())
