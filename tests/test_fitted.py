"""Parts fitted on the reference pool (Adv-kNN's heads) are cached beside the pool's features.

Real code on real data: the digits config tree, an untrained (seeded) smallcnn and the store
``ask-attack`` builds (``ask.wiring.build_store``), its features cached in ``tmp_path``.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ask.attacks import ThreatModel, build_attack
from ask.attacks.advknn import AdvKNNAttack
from ask.data import load_dataset, to_float
from ask.knn.fitted import fitted_path
from ask.wiring import build_model_for, build_store
from tests.conftest import compose_run, zero_torch_record

LAYER = "block2"
FIT = {"fit_steps": 15, "fit_points": 400}  # small: the cache, not the fit, is under test


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    cache = tmp_path_factory.mktemp("fitted-cache")
    run = compose_run("attack", ["knn.layers=[block1,block2]", "knn.pool_per_class=60"], cache)
    data = load_dataset(run.dataset, run.cache_dir, seed=run.seed, progress=False)
    torch.manual_seed(0)
    model = build_model_for(run, data).eval()
    return run, data, model


def store_of(digits, checkpoint: str = "ckpt-a", **knn):
    run, data, model = digits
    run = replace(run, knn=replace(run.knn, **knn))
    return build_store(run, model, data, checkpoint, list(run.knn.layers), torch.device("cpu"))


def advknn(digits, store, layer: str = LAYER, **hyper) -> AdvKNNAttack:
    _, _, model = digits
    settings = {"layers": [layer], "k": 5, **FIT, **hyper}
    return build_attack("advknn", model, ThreatModel(eps=0.1, steps=3, step_size=0.05), store=store,
                        generator=torch.Generator().manual_seed(0), **settings)


@pytest.fixture
def count_fits(monkeypatch):
    fits: list[str] = []
    fit = AdvKNNAttack._fit

    def counted(self, layer, rows, device):
        fits.append(layer)
        return fit(self, layer, rows, device)

    monkeypatch.setattr(AdvKNNAttack, "_fit", counted)
    return fits


def head_file(store) -> Path:
    (path,) = (store.cache_path / "fitted").glob("advknn-head-*.pt")
    return path


def test_a_cached_head_is_the_fitted_head_and_attacks_alike(digits, count_fits):
    store = store_of(digits)
    first = advknn(digits, store)
    fitted = first.heads()[LAYER]
    assert count_fits == [LAYER]

    # A later evaluation: a new store object over the same feature cache, a new attack object.
    again = store_of(digits)
    assert again.from_cache
    second = advknn(digits, again)
    loaded = second.heads()[LAYER]
    assert count_fits == [LAYER]  # loaded, not refitted
    for name, value in fitted.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert float(fitted.linear.weight.abs().max()) > 0  # the fit moved the weights off zero
    assert second.fit_agreement == first.fit_agreement

    _, data, _ = digits
    x, y = to_float(data.test.images[:16]), data.test.labels[:16]
    assert torch.equal(first(x, y), second(x, y))


def test_a_head_first_needed_inside_bf16_autocast_is_fitted_and_applied_in_fp32(digits):
    # ask-attack runs each attack under the run's autocast, and the head is fitted lazily at the
    # first batch; a bf16 fit saturated the head (ask.utils.precision.fp32). The head must not
    # depend on which arithmetic the run that fitted it used.
    # Two checkpoint names: two feature caches, so the second head is fitted, not loaded.
    store, other = store_of(digits, checkpoint="ckpt-fp32"), store_of(digits, checkpoint="ckpt-bf16")
    plain = advknn(digits, store).heads()[LAYER]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = advknn(digits, other).heads()[LAYER]
    for name, value in plain.state_dict().items():
        assert torch.equal(under_autocast.state_dict()[name], value), name

    features = store.features[LAYER][:32]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        log_q = under_autocast(features)
    assert log_q.dtype == torch.float32
    assert torch.equal(log_q, plain(features))


def test_the_head_key_follows_checkpoint_layer_pool_and_fit_settings(digits, count_fits):
    store = store_of(digits, checkpoint="ckpt-key")
    settings = dict(layer=LAYER, k=5, fit_steps=15)
    path = fitted_path(store, "advknn-head", settings)
    assert path is not None and path.parent == store.cache_path / "fitted"
    assert fitted_path(store, "advknn-head", {**settings, "layer": "block1"}) != path
    assert fitted_path(store, "advknn-head", {**settings, "fit_steps": 16}) != path
    # Another checkpoint or another pool: another feature cache, so another store key and file.
    other_checkpoint = store_of(digits, checkpoint="ckpt-key-b")
    other_pool = store_of(digits, checkpoint="ckpt-key", pool_per_class=50)
    for other in (other_checkpoint, other_pool):
        assert other.cache_key != store.cache_key
        assert fitted_path(other, "advknn-head", settings) != path

    advknn(digits, store).heads()
    advknn(digits, store, layer="block1").heads()
    advknn(digits, other_pool).heads()
    advknn(digits, store, fit_steps=16).heads()
    assert count_fits == [LAYER, "block1", LAYER, LAYER]  # each a fit of its own
    advknn(digits, store_of(digits, checkpoint="ckpt-key")).heads()
    assert len(count_fits) == 4


def test_a_damaged_or_stale_head_cache_is_refitted_with_a_warning(digits, count_fits, caplog):
    store = store_of(digits, checkpoint="ckpt-damaged")
    reference = advknn(digits, store).heads()[LAYER].linear.weight.clone()
    path = head_file(store)
    data = path.read_bytes()

    path.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="ask.knn.fitted"):
        refitted = advknn(digits, store).heads()[LAYER]
    assert len(count_fits) == 2 and "ignoring the cached advknn-head" in caplog.text
    assert torch.equal(refitted.linear.weight, reference)
    advknn(digits, store).heads()  # the rewritten file is good again
    assert len(count_fits) == 2

    saved = torch.load(path, weights_only=True)
    saved["key"]["settings"]["fit_steps"] = 999  # a file whose key is not this fit's
    torch.save(saved, path)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ask.knn.fitted"):
        advknn(digits, store).heads()
    assert len(count_fits) == 3 and "stale key" in caplog.text

    saved = torch.load(path, weights_only=True)
    saved["value"]["state"]["linear.weight"] = torch.zeros(3)  # mis-shaped
    torch.save(saved, path)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ask.knn.fitted"):
        head = advknn(digits, store).heads()[LAYER]
    assert len(count_fits) == 4 and "malformed" in caplog.text
    assert torch.equal(head.linear.weight, reference)

    record = zero_torch_record(path)  # a tensor's bytes zeroed in place: torch.load alone reads the zeros
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ask.knn.fitted"):
        head = advknn(digits, store).heads()[LAYER]
    assert len(count_fits) == 5 and f"its record {record} does not match its CRC-32" in caplog.text
    assert torch.equal(head.linear.weight, reference)


def test_a_store_without_a_cache_directory_fits_every_time(digits, count_fits):
    store = store_of(digits, cache=False)
    assert store.cache_path is None
    advknn(digits, store).heads()
    advknn(digits, store).heads()
    assert count_fits == [LAYER, LAYER]


def test_the_dknn_attack_eta_is_cached_and_a_damaged_file_recomputed(digits, monkeypatch, caplog):
    from ask.attacks.dknn_attack import DkNNAttack

    searches: list[str] = []
    measure = DkNNAttack._mean_kth_distance

    def counted(self, layer, rows):
        searches.append(layer)
        return measure(self, layer, rows)

    monkeypatch.setattr(DkNNAttack, "_mean_kth_distance", counted)
    _, _, model = digits

    def dknn(store, **hyper):
        return build_attack("dknn", model, ThreatModel(eps=0.1), store=store, layers=["block1", LAYER],
                            **{"m": 5, "k": 5, **hyper})

    store = store_of(digits, checkpoint="ckpt-eta")
    eta = dknn(store).thresholds()
    assert searches == ["block1", LAYER] and all(value > 0 for value in eta.values())
    assert dknn(store_of(digits, checkpoint="ckpt-eta")).thresholds() == eta  # loaded
    assert len(searches) == 2
    dknn(store, k=4).thresholds()  # another rank: another eta
    assert len(searches) == 4

    for path in (store.cache_path / "fitted").glob("dknn-eta-*.pt"):
        path.write_bytes(b"not a torch file")
    with caplog.at_level(logging.WARNING, logger="ask.knn.fitted"):
        assert dknn(store).thresholds() == eta
    assert len(searches) == 6 and "ignoring the cached dknn-eta" in caplog.text


def test_dknn_calibration_is_cached_per_split_and_model(digits, monkeypatch, caplog):
    from ask.knn import DkNNClassifier

    run, data, model = digits
    calls: list[int] = []
    neighbor_labels = DkNNClassifier.neighbor_labels

    def counted(self, x):  # calibration looks up each batch's neighbours once
        calls.append(x.shape[0])
        return neighbor_labels(self, x)

    monkeypatch.setattr(DkNNClassifier, "neighbor_labels", counted)
    store = store_of(digits, checkpoint="ckpt-calibration")
    images, labels = data.test.images[:120], data.test.labels[:120]  # any labelled split held out of the pool

    def calibrated(images=images, labels=labels, model=model) -> DkNNClassifier:
        return DkNNClassifier(model, store, ["block1", LAYER], 5, images, labels, batch_size=50)

    first = calibrated()
    assert calls == [50, 50, 20] and int(first.calibration_scores.max()) > 0
    again = calibrated()
    assert calls == [50, 50, 20]  # loaded
    assert torch.equal(again.calibration_scores, first.calibration_scores)
    x = to_float(data.test.images[200:230])
    assert torch.equal(again.predict_with_confidence(x)[1], first.predict_with_confidence(x)[1])

    changed = labels.clone()
    changed[0] = (changed[0] + 1) % 10
    other_model = build_model_for(run, data).eval()  # other weights
    for split in (dict(images=images[:100], labels=labels[:100]), dict(labels=changed), dict(model=other_model)):
        calls.clear()
        calibrated(**split)
        assert len(calls) >= 2  # calibrated anew

    for path in (store.cache_path / "fitted").glob("dknn-calibration-*.pt"):
        saved = torch.load(path, weights_only=True)
        saved["value"] = saved["value"].flip(0)  # no longer sorted
        torch.save(saved, path)
    calls.clear()
    with caplog.at_level(logging.WARNING, logger="ask.knn.fitted"):
        assert torch.equal(calibrated().calibration_scores, first.calibration_scores)
    assert calls == [50, 50, 20] and "malformed" in caplog.text
