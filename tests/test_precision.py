"""bf16 autocast and channels-last: when they switch on, what they change, and what records say."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ask.cli.attack import auto_checkpoint
from ask.data import load_dataset
from ask.errors import ConfigError
from ask.evaluation.job import run_attack_job
from ask.models.checkpoint import load_checkpoint
from ask.training.trainer import train
from ask.utils import precision
from tests.conftest import compose_run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import precision_check  # noqa: E402  (scripts/ is not a package)

TINY = ["dataset.train_per_class=20", "dataset.test_per_class=5", "train.batch_size=32",
        "train.schedule=constant", "model.width=8", "train.epochs=1"]
CPU = torch.device("cpu")


@pytest.mark.parametrize(("given", "meant"), [("true", "auto"), ("false", "off"), ("auto", "auto"),
                                              ("bf16", "bf16"), ("off", "off"), ("OFF", "off")])
def test_amp_settings_compose_from_the_command_line(given: str, meant: str, cache_dir: Path) -> None:
    run = compose_run("attack", [f"train.amp={given}", f"eval.amp={given}"], cache_dir)
    assert run.train.amp == meant and run.eval is not None and run.eval.amp == meant


@pytest.mark.parametrize("field", ["train.amp", "eval.amp"])
def test_an_unknown_amp_setting_is_refused_with_the_choices(field: str, cache_dir: Path) -> None:
    with pytest.raises(ConfigError, match=rf"{field}='fp16' is not one of auto, bf16, off"):
        compose_run("attack", [f"{field}=fp16"], cache_dir)


def test_auto_means_bf16_only_on_hardware_with_bf16_units(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.resolve_amp("auto", CPU) is None
    assert "no bf16 units" in precision.describe("auto", None, CPU, "training")
    assert precision.resolve_amp("bf16", CPU) is torch.bfloat16  # forced: emulated, for numerics checks
    assert "emulated" in precision.describe("bf16", torch.bfloat16, CPU, "training")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.resolve_amp("auto", CPU) is torch.bfloat16
    assert precision.resolve_amp("off", CPU) is None
    assert "native" in precision.describe("auto", torch.bfloat16, CPU, "training")
    assert [precision.precision_name(d) for d in (None, torch.bfloat16)] == ["fp32", "bf16"]


def test_fp32_switches_autocast_off_inside_and_restores_it_after() -> None:
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    outside = torch.mm(a, b)  # fp32, no autocast anywhere
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.mm(a, b).dtype == torch.bfloat16
        with precision.fp32():
            assert not torch.is_autocast_enabled("cpu")
            assert torch.equal(torch.mm(a, b), outside)
        assert torch.mm(a, b).dtype == torch.bfloat16


def test_bf16_training_runs_under_autocast_and_says_so(tmp_path: Path, cache_dir: Path) -> None:
    fp32 = train(compose_run("train", [*TINY, "train.amp=off"], cache_dir), tmp_path / "fp32")
    bf16 = train(compose_run("train", [*TINY, "train.amp=bf16"], cache_dir), tmp_path / "bf16")
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16")
    a = load_checkpoint(tmp_path / "fp32" / "last.pt")
    b = load_checkpoint(tmp_path / "bf16" / "last.pt")
    # Same seed, same batches: only the arithmetic differs, and bf16's 8-bit mantissa shows in
    # the weights after a few steps, while the loss stays where fp32's is.
    largest = max((a["state_dict"][k].float() - b["state_dict"][k].float()).abs().max().item()
                  for k in a["state_dict"] if a["state_dict"][k].is_floating_point())
    assert largest > 1e-4
    assert b["metrics"]["train_loss"] == pytest.approx(a["metrics"]["train_loss"], rel=0.05)


def test_channels_last_training_equals_the_contiguous_layout(tmp_path: Path, cache_dir: Path) -> None:
    runs = {}
    for layout in ("true", "false"):
        train(compose_run("train", [*TINY, "train.amp=off", f"train.channels_last={layout}"], cache_dir),
              tmp_path / layout)
        runs[layout] = load_checkpoint(tmp_path / layout / "last.pt")
    for key, value in runs["false"]["state_dict"].items():
        torch.testing.assert_close(runs["true"]["state_dict"][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_attacks_under_bf16_are_recorded_and_keep_the_success_rates(tmp_path: Path, shared_cache: Path) -> None:
    run = compose_run("attack", [], shared_cache)
    checkpoint = auto_checkpoint(run, load_dataset(run.dataset, run.cache_dir, seed=run.seed, progress=False))
    results = {}
    for amp in ("off", "bf16"):
        metrics = run_attack_job(compose_run("attack", [
            f"model.checkpoint={checkpoint}", "attack=[ask,pgd]", "eval.victims=[dnn,knn]", "eval.n_points=64",
            f"eval.amp={amp}"], shared_cache), tmp_path / amp)
        assert metrics["precision"] == {"off": "fp32", "bf16": "bf16"}[amp]
        results[amp] = {(r["attack"], r["victim"]): r for r in metrics["results"]}
    for key, row in results["off"].items():
        # Victims judge in fp32 either way: the clean accuracies are the same numbers.
        assert results["bf16"][key]["clean_acc"] == row["clean_acc"], key
        assert results["bf16"][key]["asr"] == pytest.approx(row["asr"], abs=0.05), key
    # scripts/precision_check.py's flip counts explain the difference point by point.
    for attack, victim in (("ask", "knn"), ("pgd", "knn"), ("pgd", "dnn")):
        flips = precision_check._flips(tmp_path / "off", tmp_path / "bf16", attack, victim)
        row, row_bf16 = results["off"][(attack, victim)], results["bf16"][(attack, victim)]
        right = round(row["clean_acc"] * row["n_points"])
        net = flips["robust_fp32_only"] - flips["robust_bf16_only"]
        assert net == round((row_bf16["asr"] - row["asr"]) * right), (attack, victim, flips)


def test_precision_check_counts_flips_among_points_both_runs_got_right(tmp_path: Path) -> None:
    # point: (clean, ask) in fp32, then in bf16; 1 = right
    fates = {"0": ("1", "1", "1", "0"), "1": ("1", "0", "1", "1"), "2": ("1", "1", "1", "0"),
             "3": ("0", "0", "0", "0"), "4": ("1", "1", "1", "1"), "5": ("1", "0", "1", "0")}
    for amp, columns in (("off", slice(0, 2)), ("bf16", slice(2, 4))):
        (tmp_path / amp).mkdir()
        rows = ["point,label,victim,clean,ask"] + [f"{p},0,knn,{','.join(f[columns])}" for p, f in fates.items()]
        rows += [f"{p},0,dnn,1,1" for p in fates]  # another victim's rows are not counted
        (tmp_path / amp / "per_point.csv").write_text("\n".join(rows) + "\n")
    flips = precision_check._flips(tmp_path / "off", tmp_path / "bf16", "ask", "knn")
    assert flips == {"robust_fp32_only": 2, "robust_bf16_only": 1}
    assert precision_check._flips(tmp_path / "off", tmp_path / "bf16", "ask", "dnn") == {
        "robust_fp32_only": 0, "robust_bf16_only": 0}
