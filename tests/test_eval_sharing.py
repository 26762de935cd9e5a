"""An evaluation batch shares its kNN searches and forward passes; the numbers stay those of unshared runs.

Real code on real data: the digits config tree with all six attacks and four victims, an
untrained (seeded) smallcnn, the store ``ask-attack`` builds, and ``evaluate`` itself.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import ask.wiring as wiring_module
from ask.data import load_dataset, select_points, to_float
from ask.evaluation.evaluate import evaluate
from ask.knn import DkNNClassifier, DkNNVoteClassifier, KNNClassifier
from ask.wiring import build_model_for, build_store, build_victims
from tests.conftest import compose_run


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    run = compose_run("attack", ["knn.dknn_layers=[block1,block2]", "dataset.calib_per_class=10",
                                 "attack.steps=4", "attack.methods.advknn.fit_steps=20", "eval.batch_size=48"],
                      tmp_path_factory.mktemp("sharing-cache"))
    data = load_dataset(run.dataset, run.cache_dir, seed=run.seed, progress=False)
    torch.manual_seed(0)
    model = build_model_for(run, data).eval()
    store = build_store(run, model, data, "untrained", ["block1", "block2"], torch.device("cpu"))
    return run, data, model, store


def test_victims_share_one_forward_pass_and_score_as_alone(digits, monkeypatch):
    run, data, model, store = digits
    victims = build_victims(["dnn", "knn", "dknn", "dknn_vote"], model, store, run, data.calib)
    x = to_float(data.test.images[:40])
    flipped = x.flip(3)
    passes = []
    forward_features = model.forward_features
    monkeypatch.setattr(model, "forward_features", lambda *a, **kw: passes.append(1) or forward_features(*a, **kw))
    with torch.no_grad():
        shared = {v.name: v.judge(x) for v in victims}
        assert len(passes) == 1  # four victims, one pass
        shared_adv = {v.name: v.judge(flipped) for v in victims}
        assert len(passes) == 2  # another input, another pass
    assert not model.training  # the victims left the network in eval mode
    monkeypatch.undo()

    dknn = DkNNClassifier(model, store, run.knn.dknn_layers, run.knn.k, data.calib.images, data.calib.labels)
    with torch.no_grad():
        for images, judged in ((x, shared), (flipped, shared_adv)):
            pred, credibility, _ = dknn.predict_with_confidence(images)
            assert torch.equal(judged["dknn"][0], pred) and torch.equal(judged["dknn"][1], credibility)
            assert torch.equal(judged["dnn"][0], model(images).argmax(1))
            assert torch.equal(judged["knn"][0], KNNClassifier(model, store, "block2", run.knn.k).predict(images))
            vote = DkNNVoteClassifier(model, store, run.knn.dknn_layers, run.knn.k).predict(images)
            assert torch.equal(judged["dknn_vote"][0], vote)
    assert 0.0 < float((shared["knn"][0] == data.test.labels[:40]).float().mean()) < 1.0


def test_evaluate_gives_the_numbers_of_an_unshared_run(digits, monkeypatch):
    run, data, model, store = digits
    points = select_points(data.test, 96, run.seed)  # two batches of 48
    rows, _, _ = evaluate(run, model, points, store, torch.device("cpu"), calibration=data.calib)

    # The same evaluation with every search and every victim's forward pass done on its own.
    monkeypatch.setattr(type(store), "shared_searches", lambda self, depth=0: contextlib.nullcontext())
    monkeypatch.setattr(wiring_module, "_OneForwardPerInput", lambda model, layers, logits: model)
    searches = []
    search = store.search
    monkeypatch.setattr(store, "search", lambda *a: searches.append(1) or search(*a))
    alone, _, _ = evaluate(run, model, points, store, torch.device("cpu"), calibration=data.calib)
    assert len(searches) > 0

    def numbers(table):
        return [{k: v for k, v in row.items() if k not in ("seconds", "images_per_second")} for row in table]

    assert numbers(rows) == numbers(alone)
    attacks = {row["attack"] for row in rows}
    assert attacks == {"ask", "pgd", "dknn", "advknn", "feature", "minnorm", "any"}
    assert any(row["asr"] and row["asr"] > 0 for row in rows)  # the attacks did something to compare

    # The DkNN rows' credibility columns: on the clean points, the classifier's own mean credibility.
    dknn = DkNNClassifier(model, store, run.knn.dknn_layers, run.knn.k, data.calib.images, data.calib.labels)
    with torch.no_grad():
        clean_credibility = float(dknn.predict_with_confidence(to_float(points.images))[1].mean())
    dknn_rows = [row for row in rows if row["victim"] == "dknn" and row["attack"] != "any"]
    assert len(dknn_rows) == 6
    for row in dknn_rows:
        assert row["mean_credibility_clean"] == pytest.approx(clean_credibility, rel=1e-6), row["attack"]
        assert 0.0 <= row["mean_credibility_adv"] <= 1.0
    assert any(abs(row["mean_credibility_adv"] - clean_credibility) > 1e-3 for row in dknn_rows)
