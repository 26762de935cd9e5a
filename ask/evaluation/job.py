"""The ``ask-attack`` job: model -> reference store -> attacks x victims -> ``metrics.json``."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from ask.config.schema import RunConfig
from ask.data import DataBundle, load_dataset, point_indices, select_points
from ask.errors import ConfigError
from ask.evaluation.evaluate import evaluate, evaluation_key
from ask.models.checkpoint import load_checkpoint
from ask.utils import precision
from ask.utils.io import atomic_write_text, require_file_slot
from ask.utils.runfiles import BEST_CHECKPOINT, EVAL_STATE_FILE, METRICS_FILE, PER_POINT_FILE
from ask.utils.runtime import configure_backends, seed_everything, select_device
from ask.wiring import build_model_for, build_store, load_model

log = logging.getLogger(__name__)


def file_digest(path: str | Path) -> str:
    sha = hashlib.sha1()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()[:16]


def check_calibration_split(run: RunConfig, data: DataBundle) -> None:
    """Refuse, before any model is trained or loaded, a DkNN victim without its calibration split."""
    assert run.eval is not None
    if "dknn" in run.eval.victims and data.calib is None:
        raise ConfigError(
            "victim 'dknn' needs a calibration split; set dataset.calib_per_class=N (e.g. 100) "
            "or use eval.victims=[dknn_vote]"
        )


def run_attack_job(run: RunConfig, output_dir: str | Path, data: DataBundle | None = None) -> dict[str, Any]:
    """Evaluate ``run.attack.methods`` x ``run.eval.victims``; write and return ``metrics.json``.

    The network is ``model.checkpoint`` (an ask checkpoint) or ``model.weights`` (a plain
    state_dict); ``ask-attack`` trains the dataset's default model first when neither is given
    (:mod:`ask.cli.attack`). ``data`` is ``run.dataset`` already loaded, if it was.
    """
    assert run.attack is not None and run.eval is not None
    output_dir = Path(output_dir)
    require_file_slot(output_dir / METRICS_FILE, output_dir / PER_POINT_FILE, output_dir / EVAL_STATE_FILE)
    device = select_device(run.device)
    seed_everything(run.seed, run.deterministic)
    fp32_mode = configure_backends(device, run.deterministic, run.tf32)
    # A damaged checkpoint is refused before a long dataset decode, not after it.
    given = load_checkpoint(run.model.checkpoint) if run.model.checkpoint else None
    if data is None:
        data = load_dataset(run.dataset, run.cache_dir, seed=run.seed, progress=run.progress)
    check_calibration_split(run, data)
    if run.model.weights:  # a plain state_dict: the network is built from the config, then loaded
        checkpoint = Path(run.model.weights).expanduser()
        model = build_model_for(run, data).to(device).eval()
    elif run.model.checkpoint:
        checkpoint = Path(run.model.checkpoint).expanduser()
        model = load_model(checkpoint, run, data, device, given)
    else:
        raise ConfigError("no model.checkpoint and no model.weights given; point model.checkpoint at a "
                          f"{BEST_CHECKPOINT} written by ask-train (ask-attack trains the default model itself)")

    dknn_layers = list(run.knn.dknn_layers) if {"dknn", "dknn_vote"} & set(run.eval.victims) else []
    layers = list(dict.fromkeys(
        list(run.knn.layers) + dknn_layers
        + [layer for name in run.attack.methods for layer in getattr(run.attack.settings(name), "layers", [])]
    ))
    model.check_layers(layers)
    checkpoint_digest = file_digest(checkpoint)  # keys both the feature cache and the evaluation state
    store = build_store(run, model, data, checkpoint_digest, layers, device)
    points = select_points(data.test, run.eval.n_points, run.seed)
    if run.eval.n_points is not None and run.eval.n_points > len(points):
        # Not an error: "as many as there are" is a fair reading, and metrics.json records n_points.
        log.warning("eval.n_points=%d but the test split has %d points; evaluating all %d",
                    run.eval.n_points, len(points), len(points))
    # Per-batch progress: the same command in the same output directory resumes an interrupted run.
    state_path = output_dir / EVAL_STATE_FILE
    state_key = evaluation_key(run, checkpoint_digest, points, device)
    rows, warnings, outcomes = evaluate(run, model, points, store, device, calibration=data.calib,
                                        state_path=state_path, state_key=state_key)
    # Written before metrics.json: a run with metrics.json always has the points its rows count.
    indices = point_indices(len(data.test), run.eval.n_points, run.seed)
    atomic_write_text(output_dir / PER_POINT_FILE, outcomes.to_csv(indices, points.labels))

    metrics = {
        "dataset": run.dataset.name,
        "model": run.model.name,
        "checkpoint": str(checkpoint),
        # What the report tells runs apart by: the model's content and the data's location.
        "checkpoint_digest": checkpoint_digest,
        "dataset_root": str(Path(run.dataset.root).expanduser().resolve()) if run.dataset.root else None,
        "layers": list(run.knn.layers),
        "k": run.knn.k,
        "metric": run.knn.metric,
        "n_points": len(points),
        "eps": run.attack.eps,
        "norm": run.attack.norm,
        "steps": run.attack.steps,
        "seed": run.seed,
        "device": str(device),
        "precision": precision.precision_name(precision.resolve_amp(run.eval.amp, device)),  # the attacks'
        "float32_precision": fp32_mode,  # ieee, or tf32 on a GPU with tf32=true
        "torch_threads": torch.get_num_threads(),  # of the process that finished the evaluation
        "dknn_layers": dknn_layers,
        # How exact the neighbour search was: flat is exact; ivf carries its measured recall@k.
        "knn_index": (store.index_report(k=run.knn.k, layers=list(run.knn.layers)) if run.knn.index != "flat"
                      else {"index": "flat", "feature_dtype": run.knn.feature_dtype, "n": len(store)}),
        "results": rows,
        "warnings": warnings,
    }
    atomic_write_text(output_dir / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
    # Only once the results are safely on disk: a crash before this line still resumes.
    state_path.unlink(missing_ok=True)
    return metrics
