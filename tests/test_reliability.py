"""The bad-input table of docs/RELIABILITY.md, row by row, through the installed console scripts.

The rows are read from the document, so the table and the tests cannot drift apart. Setup that
rows share (a trained checkpoint, fake ImageFolder trees, damaged checkpoints, a run that is about
to hit a NaN loss, a stale feature cache) is built once per module, and only for the placeholders
that the selected rows use. The rows then run two at a time (``ASK_TEST_WORKERS``), each in a
process of its own forked from the session's zygote (tests/prewarmed.py), which has imported torch
already; ``ASK_TEST_FORK=0`` starts each from its ``bin/`` wrapper instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, npy_data_offset, run_cli, zero_in_place, zero_torch_record

DOC = REPO / "docs" / "RELIABILITY.md"
SECTION = "## Bad input"
# What a failing run may leave in its directory: Hydra's own records, written before the task runs.
ALLOWED_AFTER_FAILURE = (".hydra", "config.yaml", ".lock")
# Rows that fail after finished work of their own, which they keep (their own checks below say what).
FAILS_AFTER_GOOD_WORK = {"loss-becomes-nan-after-a-good-epoch"}
WORKERS = int(os.environ.get("ASK_TEST_WORKERS", "2"))
TINY_TRAIN = ["dataset.train_per_class=20", "train.epochs=1", "train.batch_size=32", "model.width=8"]
# The damaged auto-trained model row's command without cache_dir: the setup runs it first, to train the model.
BROKEN_MODEL = ["dataset.train_per_class=20", "train.epochs=1", "train.batch_size=32", "model.width=8", "attack=[pgd]",
                "eval.victims=[knn]", "eval.n_points=5"]
# Placeholders that the row changes on purpose (rebuilt caches), or that cannot be read (a loop of links).
UNWATCHED = {"tmp", "run", "stale_cache", "stale_entry", "broken_model_cache", "broken_model", "loop",
             "zeroed_feature_cache", "zeroed_feature_entry"}
# A 16-bit greyscale PNG's values, per (split, class, file): the decoded pixels must be their high byte.
SIXTEEN_BIT_SEED = 16
REPLACEMENT_COLOUR = (9, 99, 199)


@dataclass(frozen=True)
class Row:
    what: str
    command: str
    message: str
    exit: int

    @property
    def id(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.what.lower()).strip("-")

    @property
    def placeholders(self) -> set[str]:
        return set(re.findall(r"\{(\w+)\}", self.command + self.message))


def _cell(text: str) -> str:
    text = text.strip()
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] == "`" else text


def read_rows(path: Path = DOC) -> list[Row]:
    """The rows of the four-column table under ``## Bad input``."""
    text = path.read_text()
    body = text[text.index(SECTION) + len(SECTION):]
    body = body.split("\n## ", 1)[0]
    rows = []
    for line in body.splitlines():
        cells = line.strip().strip("|").split("|") if line.startswith("|") else []
        if len(cells) != 4 or set(cells[0].strip()) <= set("-: ") or cells[0].strip() == "what is wrong":
            continue
        what, command, message, code = (_cell(c) for c in cells)
        rows.append(Row(what, command, message, int(code)))
    return rows


ROWS = read_rows()


def test_the_table_is_well_formed() -> None:
    assert len(ROWS) >= 40
    ids = [row.id for row in ROWS]
    assert len(ids) == len(set(ids)), "two rows share a description"
    for row in ROWS:
        assert row.command.split()[0] in ("ask-train", "ask-attack", "ask-report"), row.command
        assert row.exit == 0 or row.message.startswith(f"{row.command.split()[0]}: error: "), row.what
        for name in row.placeholders - {"tmp", "run"}:
            assert hasattr(Setup, f"make_{name}"), f"{row.what}: no setup for {{{name}}}"


# ----------------------------------------------------------------------------------- the setup
def _cli(args: list[str], cwd: Path, cache: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_cli(args[0], args[1:], cwd, cache, timeout, env={"OMP_NUM_THREADS": "1"})


def _ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _png_tree(root: Path, splits: dict[str, list[str]], per_class: int = 4, size: int = 8) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, classes in splits.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        for name in classes:
            (root / split / name).mkdir()
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


class _RunsCode:
    """Unpickling this runs ``touch marker``: what a tampered checkpoint would do if loaded unsafely."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


class Setup:
    """Builds each placeholder's file or folder on first use; ``marker`` must never appear."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache = root / "cache"
        self.marker = root / "CODE_RAN"
        self.values: dict[str, Path] = {}
        self.snapshots: dict[str, dict[str, str]] = {}
        self.records: dict[Path, dict[str, str]] = {}  # a finished run's config.yaml and .hydra/ as set up

    def get(self, name: str) -> Path:
        if name not in self.values:
            self.values[name] = getattr(self, f"make_{name}")()
        return self.values[name]

    # Checkpoints ---------------------------------------------------------------------------
    def make_ckpt(self) -> Path:
        work = self.root / "trained"
        _ok(_cli(["ask-train", *TINY_TRAIN, "progress=false", f"hydra.run.dir={work}"], self.root, self.cache))
        return work / "best.pt"

    def make_ckpt_val(self) -> Path:  # its epoch was scored on a val split, so its best.pt has a rule
        work = self.root / "trained_val"
        _ok(_cli(["ask-train", *TINY_TRAIN, "dataset.val_per_class=5", "progress=false", f"hydra.run.dir={work}"],
                 self.root, self.cache))
        return work / "last.pt"

    def make_ckpt_b(self) -> Path:
        import torch

        payload = torch.load(self.get("ckpt"), weights_only=True)
        generator = torch.Generator().manual_seed(1)
        for key, value in payload["state_dict"].items():
            if value.is_floating_point() and "running" not in key:
                value.add_(0.05 * value.std() * torch.randn(value.shape, generator=generator))
        path = self.root / "other" / "best.pt"
        path.parent.mkdir()
        torch.save(payload, path)
        return path

    def make_truncated(self) -> Path:
        data = self.get("ckpt").read_bytes()
        path = self.root / "truncated.pt"
        path.write_bytes(data[: len(data) // 2])
        return path

    def make_tampered(self) -> Path:
        import torch

        path = self.root / "tampered.pt"
        torch.save({"format": "ask-checkpoint", "version": 1, "state_dict": {}, "hook": _RunsCode(self.marker)}, path)
        return path

    def make_pickle(self) -> Path:
        path = self.root / "pickled.pt"
        path.write_bytes(pickle.dumps({"format": "ask-checkpoint", "hook": _RunsCode(self.marker)}, protocol=2))
        return path

    def make_zeroed_ckpt(self) -> Path:
        path = self.root / "zeroed.pt"
        shutil.copyfile(self.get("ckpt"), path)
        zero_torch_record(path)
        return path

    def make_weights_only(self) -> Path:
        import torch

        path = self.root / "weights.pt"
        torch.save(torch.load(self.get("ckpt"), weights_only=True)["state_dict"], path)
        return path

    def make_text_pt(self) -> Path:
        path = self.root / "notes.pt"
        path.write_text("not a checkpoint\n")
        return path

    def make_empty_pt(self) -> Path:
        path = self.root / "empty.pt"
        path.write_bytes(b"")
        return path

    def _edited_ckpt(self, name: str, edit: Callable[[dict], None]) -> Path:
        import torch

        payload = torch.load(self.get("ckpt"), weights_only=True)
        edit(payload)
        path = self.root / name
        torch.save(payload, path)
        return path

    def make_nan_ckpt(self) -> Path:
        """What a diverged training saves: the first weight tensor is NaN."""
        return self._edited_ckpt("nan.pt", lambda p: p["state_dict"]["stages.block1.0.weight"].fill_(float("nan")))

    def make_headless_ckpt(self) -> Path:
        return self._edited_ckpt("headless.pt", lambda p: p["model"].pop("width"))

    def make_renamed_ckpt(self) -> Path:
        def rename(payload: dict) -> None:
            weights = payload["state_dict"]
            weights["stages.block1.0.renamed"] = weights.pop("stages.block1.0.weight")

        return self._edited_ckpt("renamed.pt", rename)

    # Paths the operating system refuses --------------------------------------------------------
    def make_loop(self) -> Path:
        path = self.root / "loop"
        path.symlink_to(path.name)
        return path

    def make_a_file(self) -> Path:
        path = self.root / "a_file"
        path.write_text("not a folder\n")
        return path

    def make_metrics_folder_run(self) -> Path:
        path = self.root / "metrics_folder_run"
        (path / "metrics.json").mkdir(parents=True)
        return path

    def _full_disk(self, name: str) -> Path:
        """A run directory whose lock and log files are /dev/full: every write to them fails with ENOSPC."""
        path = self.root / name
        path.mkdir()
        for file in (".lock", "ask-train.log", "ask-attack.log"):  # Hydra logs to <hydra.job.name>.log
            (path / file).symlink_to("/dev/full")
        return path

    def make_full_disk(self) -> Path:
        return self._full_disk("full_disk")

    def make_full_disk_2(self) -> Path:  # a second one: two runs on one lock file would refuse each other
        return self._full_disk("full_disk_2")

    # Reports ---------------------------------------------------------------------------------
    def make_report_folder(self) -> Path:
        path = self.root / "report_folder"
        (path / "report.md").mkdir(parents=True)
        return path

    def make_failed_sweep(self) -> Path:
        """A sweep directory whose only job failed."""
        path = self.root / "failed_sweep"
        (path / "0").mkdir(parents=True)
        (path / "0" / "failure.json").write_text(json.dumps({"error": "attack.eps=-1.0 must be >= 0",
                                                             "type": "ConfigError"}) + "\n")
        return path

    def make_broken_model_cache(self) -> Path:
        """A cache whose auto-trained model (the BROKEN_MODEL recipe) was cut in half after training."""
        cache = self.root / "broken_model_cache"
        _ok(_cli(["ask-attack", *BROKEN_MODEL, "progress=false", f"cache_dir={cache}",
                  f"hydra.run.dir={self.root / 'broken_model_run'}"], self.root, cache))
        (best,) = (cache / "models").glob("*/best.pt")
        best.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
        self.values["broken_model"] = best
        return cache

    def make_broken_model(self) -> Path:
        self.get("broken_model_cache")
        return self.values["broken_model"]

    # Dataset folders -----------------------------------------------------------------------
    def make_folder3(self) -> Path:
        return _png_tree(self.root / "folder3", {"train": ["a", "b", "c"], "test": ["a", "b", "c"]})

    def make_folder10(self) -> Path:
        classes = [str(c) for c in range(10)]
        return _png_tree(self.root / "folder10", {"train": classes, "test": classes}, per_class=2)

    def make_folder_mismatch(self) -> Path:
        return _png_tree(self.root / "mismatch", {"train": ["cat", "dog", "frog"], "test": ["cat", "dog", "horse"]})

    def make_folder_empty(self) -> Path:
        path = self.root / "empty"
        path.mkdir()
        return path

    def make_folder_no_classes(self) -> Path:
        return _png_tree(self.root / "no_classes", {"train": [], "test": []})

    def make_folder_empty_class(self) -> Path:
        root = _png_tree(self.root / "empty_class", {"train": ["a", "b"], "test": ["a", "b"]})
        for image in (root / "train" / "b").iterdir():
            image.unlink()
        return root

    def make_replaced_folder(self) -> Path:
        """BMPs (all of one byte size) decoded into the rows' cache, then one of them rewritten in
        place with other pixels and its times put back (what ``cp -p`` does)."""
        from PIL import Image

        from ask.config.schema import DatasetConfig
        from ask.data import load_dataset

        root = self.root / "replaced_folder"
        for split, count in (("train", 8), ("test", 2)):
            for label, name in enumerate(("a", "b", "c")):
                (root / split / name).mkdir(parents=True)
                for j in range(count):
                    Image.new("RGB", (8, 8), (80 * label, 10 * j, 100)).save(root / split / name / f"{j}.bmp")
        load_dataset(DatasetConfig(name="cifar10_folder", root=str(root)), self.cache, 0, progress=False)
        target = root / "train" / "a" / "1.bmp"
        before = target.stat()
        Image.new("RGB", (8, 8), REPLACEMENT_COLOUR).save(self.root / "replacement.bmp")
        target.write_bytes((self.root / "replacement.bmp").read_bytes())
        os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = target.stat()
        assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
        return root

    def make_folder16(self) -> Path:
        """16-bit greyscale PNGs (Pillow mode I;16), which convert('RGB') clipped to white."""
        from PIL import Image

        root = self.root / "folder16"
        rng = np.random.default_rng(SIXTEEN_BIT_SEED)
        for split, count in (("train", 8), ("test", 2)):
            for name in ("a", "b", "c"):
                (root / split / name).mkdir(parents=True)
                for j in range(count):
                    pixels = rng.integers(0, 65536, (8, 8), dtype=np.uint16)
                    Image.fromarray(pixels).save(root / split / name / f"{j}.png")
        return root

    def make_zeroed_feature_cache(self) -> Path:
        """A cache whose reference-feature entry for ``ckpt`` had its first layer's rows zeroed in place."""
        cache = self.root / "zeroed_feature_cache"
        _ok(_cli(["ask-attack", f"model.checkpoint={self.get('ckpt')}", "attack=[pgd]", "eval.victims=[knn]",
                  "eval.n_points=20", "progress=false", f"cache_dir={cache}",
                  f"hydra.run.dir={self.root / 'zeroed_a'}"], self.root, cache))
        (entry,) = (cache / "features").iterdir()
        features = entry / "features-0.npy"
        self.zeroed = {"features": features.read_bytes(), "metrics": self.root / "zeroed_a" / "metrics.json"}
        zero_in_place(features, npy_data_offset(features))
        self.values["zeroed_feature_entry"] = entry
        return cache

    def make_zeroed_feature_entry(self) -> Path:
        self.get("zeroed_feature_cache")
        return self.values["zeroed_feature_entry"]

    # Runs ----------------------------------------------------------------------------------
    def make_stale_cache(self) -> Path:
        """A cache whose entry for ``ckpt_b``'s features holds ``ckpt``'s (as after a copy or a clash)."""
        cache = self.root / "stale_cache"
        features = cache / "features"
        args = ["ask-attack", "attack=[pgd]", "eval.victims=[knn]", "eval.n_points=20", "progress=false",
                f"cache_dir={cache}"]
        _ok(_cli([*args, f"model.checkpoint={self.get('ckpt')}", f"hydra.run.dir={self.root / 'stale_a'}"],
                 self.root, cache))
        (entry_a,) = features.iterdir()
        _ok(_cli([*args, f"model.checkpoint={self.get('ckpt_b')}", f"hydra.run.dir={self.root / 'stale_b'}"],
                 self.root, cache))
        (entry_b,) = set(features.iterdir()) - {entry_a}
        # Whatever the cache's layout (one file or a folder per entry), b's now holds a's features.
        if entry_b.is_dir():
            shutil.rmtree(entry_b)
            shutil.copytree(entry_a, entry_b)
        else:
            shutil.copyfile(entry_a, entry_b)
        self.values["stale_entry"] = entry_b
        self.stale = {"a": entry_a, "b": entry_b, "metrics_b": self.root / "stale_b" / "metrics.json"}
        return cache

    def make_stale_entry(self) -> Path:
        self.get("stale_cache")
        return self.values["stale_entry"]

    def make_attack_run(self) -> Path:
        work = self.root / "attack_run"
        _ok(_cli(["ask-attack", f"model.checkpoint={self.get('ckpt')}", "attack=[pgd]", "eval.victims=[knn]",
                  "eval.n_points=20", "progress=false", f"hydra.run.dir={work}"], self.root, self.cache))
        self.records[work] = _records(work)
        return work

    def make_attack_run_b(self) -> Path:
        return self._copy_run(self.get("attack_run"), "attack_run_b")

    def make_train_run(self) -> Path:
        return self._copy_run(self.get("ckpt").parent, "train_run")

    def _copy_run(self, source: Path, name: str) -> Path:
        work = shutil.copytree(source, self.root / name)  # config.yaml names no path inside the run
        self.records[work] = _records(work)
        return work


def _records(run: Path) -> dict[str, str]:
    """sha256 of a run's records, which _digest_tree leaves out."""
    files = [run / "config.yaml", *sorted((run / ".hydra").glob("*"))]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _digest_tree(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (or of ``path``), skipping what Hydra rewrites on each run."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    skip = (".hydra", "config.yaml", ".lock")
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files
            if not any(part in skip for part in p.parts) and not p.name.endswith(".log")}


# ------------------------------------------------------------------------------------ running
@dataclass
class Outcome:
    row: Row
    done: subprocess.CompletedProcess
    run_dir: Path
    values: dict[str, str]
    before: dict[str, dict[str, str]]
    after: dict[str, dict[str, str]]


def _run_row(row: Row, setup: Setup, index: int) -> Outcome:
    tmp = setup.root / "rows" / f"{index:02d}"
    tmp.mkdir(parents=True)
    values = {"tmp": str(tmp), "run": str(tmp / "run")}
    for name in row.placeholders - {"tmp", "run"}:
        values[name] = str(setup.get(name))
    args = shlex.split(row.command.format(**values))
    if args[0] != "ask-report":  # not a Hydra application: it takes paths and options
        if not any(a.startswith("hydra.run.dir=") for a in args):
            args.append(f"hydra.run.dir={values['run']}")
        args.append("progress=false")
    run_dir = Path(next((a for a in args if a.startswith("hydra.run.dir=")), f"={values['run']}").split("=", 1)[1])
    # Rebuilt caches are meant to change; everything else a placeholder names must not.
    watched = {n: Path(values[n]) for n in row.placeholders - UNWATCHED}
    before = {n: _digest_tree(p) for n, p in watched.items()}
    done = _cli(args, tmp, setup.cache)
    after = {n: _digest_tree(p) for n, p in watched.items()}
    return Outcome(row, done, run_dir, values, before, after)


@dataclass
class Results:
    setup: Setup
    by_id: dict[str, Outcome]


@pytest.fixture(scope="module")
def results(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Results:
    """Every selected row's outcome: the setup first, one by one, then the rows two at a time."""
    selected = {item.callspec.params["row"].id for item in request.session.items
                if getattr(item, "callspec", None) and isinstance(item.callspec.params.get("row"), Row)}
    rows = [row for row in ROWS if row.id in selected]
    setup = Setup(tmp_path_factory.mktemp("reliability"))
    for row in rows:  # setup runs alone: it trains, and later rows read what it wrote
        for name in sorted(row.placeholders - {"tmp", "run"}):
            setup.get(name)
    with ThreadPoolExecutor(max_workers=max(1, WORKERS)) as pool:
        outcomes = list(pool.map(lambda pair: _run_row(pair[1], setup, pair[0]), enumerate(rows)))
    return Results(setup, {outcome.row.id: outcome for outcome in outcomes})


def _expected(message: str, values: dict[str, str]) -> str:
    """The documented message with its placeholders filled in."""
    return re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], message)


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_bad_input(row: Row, results: Results) -> None:
    if "device=cuda" in row.command.split():
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA device is visible here")
    outcome = results.by_id[row.id]
    done = outcome.done
    assert done.returncode == row.exit, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    expected = _expected(row.message, outcome.values)
    if row.exit == 0:
        lines = (done.stdout + done.stderr).splitlines()
        assert any(expected in line for line in lines), f"{expected!r} not logged:\n{done.stdout[-3000:]}"
        assert (outcome.run_dir / "metrics.json").is_file()
    else:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert lines, f"nothing on stderr; stdout:\n{done.stdout[-2000:]}"
        assert lines[-1] == expected, f"\nexpected: {expected}\nactual:   {lines[-1]}"
        if (outcome.run_dir == Path(outcome.values["run"]) and outcome.run_dir.is_dir()
                and row.id not in FAILS_AFTER_GOOD_WORK):
            left = sorted(p.name for p in outcome.run_dir.iterdir()
                          if p.name not in ALLOWED_AFTER_FAILURE and not p.name.endswith(".log"))
            assert left == [], f"the failing run wrote {left}"
    for name, files in outcome.before.items():
        assert outcome.after[name] == files, f"{{{name}}} changed"
    assert not results.setup.marker.exists(), "the pickled code of a checkpoint ran"
    check = EXTRA_CHECKS.get(row.id)
    if check is not None:
        check(outcome, results.setup)


# ------------------------------------------------------------- what some rows check besides
def _nan_run_keeps_its_last_good_epoch(outcome: Outcome, setup: Setup) -> None:
    from ask.utils.io import safe_load

    run = outcome.run_dir
    assert safe_load(run / "last.pt")["epoch"] == 1
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]


def _same_results(first: Path, again: Path) -> None:
    keys = ("attack", "victim", "clean_acc", "robust_acc", "asr", "n_points")
    rows = [[{k: r[k] for k in keys} for r in json.loads(path.read_text())["results"]] for path in (first, again)]
    assert rows[0] == rows[1]


def _stale_cache_is_rebuilt_not_used(outcome: Outcome, setup: Setup) -> None:
    stale = setup.stale
    # The file now holds ckpt_b's own features, and the numbers are those of ckpt_b's first run.
    contents = [sorted(_digest_tree(entry).values()) for entry in (stale["a"], stale["b"])]
    assert contents[0] != contents[1]
    _same_results(stale["metrics_b"], outcome.run_dir / "metrics.json")
    assert "loaded reference features" not in outcome.done.stdout + outcome.done.stderr


def _zeroed_features_are_rebuilt_not_used(outcome: Outcome, setup: Setup) -> None:
    entry = Path(outcome.values["zeroed_feature_entry"])
    assert (entry / "features-0.npy").read_bytes() == setup.zeroed["features"]  # rebuilt as first written
    _same_results(setup.zeroed["metrics"], outcome.run_dir / "metrics.json")
    assert "loaded reference features" not in outcome.done.stdout + outcome.done.stderr


def _decoded_folder(setup: Setup, root: str) -> Path:
    """The one dataset cache entry decoded from ``root``."""
    entries = [entry for entry in (setup.cache / "datasets").iterdir()
               if json.loads((entry / "meta.json").read_text())["root"] == root]
    assert len(entries) == 1, entries
    return entries[0]


def _replaced_image_is_decoded_again(outcome: Outcome, setup: Setup) -> None:
    images = np.load(_decoded_folder(setup, outcome.values["replaced_folder"]) / "train-images.npy")
    assert (images[1] == np.array(REPLACEMENT_COLOUR, dtype=np.uint8)[:, None, None]).all()  # train/a/1.bmp
    assert (images[0] == np.array((0, 0, 100), dtype=np.uint8)[:, None, None]).all()


def _sixteen_bit_pixels_keep_their_high_byte(outcome: Outcome, setup: Setup) -> None:
    images = np.load(_decoded_folder(setup, outcome.values["folder16"]) / "train-images.npy")
    rng = np.random.default_rng(SIXTEEN_BIT_SEED)  # the values make_folder16 drew, in its order
    expected = [rng.integers(0, 65536, (8, 8), dtype=np.uint16) for _ in range(3 * 8)]
    for row, pixels in enumerate(expected):
        assert (images[row] == (pixels >> 8).astype(np.uint8)).all(), row


def _records_are_kept(outcome: Outcome, setup: Setup) -> None:
    for name in outcome.row.placeholders:
        path = Path(outcome.values[name])
        if path in setup.records:
            assert _records(path) == setup.records[path], f"{{{name}}}'s config.yaml or .hydra/ changed"


def _damaged_model_is_retrained(outcome: Outcome, setup: Setup) -> None:
    from ask.models.checkpoint import load_checkpoint

    assert load_checkpoint(setup.get("broken_model"))["epoch"] == 1


def _full_disk_says_it_once(outcome: Outcome, setup: Setup) -> None:
    # Before, every log record failed on its own with a traceback ("--- Logging error ---").
    assert "Logging error" not in outcome.done.stderr
    assert len([line for line in outcome.done.stderr.splitlines() if line.strip()]) == 1, outcome.done.stderr


def _results_are_readable_by_the_group(outcome: Outcome, setup: Setup) -> None:
    from ask.utils.io import current_umask

    for name in ("metrics.json", "config.yaml"):
        assert (outcome.run_dir / name).stat().st_mode & 0o777 == 0o666 & ~current_umask(), name


def _failed_sweep_still_ran_the_other_job(outcome: Outcome, setup: Setup) -> None:
    sweep = Path(outcome.values["tmp"]) / "sweep"
    assert (sweep / "0" / "metrics.json").is_file()
    assert json.loads((sweep / "1" / "failure.json").read_text())["type"] == "ConfigError"


def _nothing_loaded_or_trained(outcome: Outcome, setup: Setup) -> None:
    # The row's own cache_dir: a setting out of range must stop the run before it decodes a
    # dataset into the cache or trains (and caches) the default model, not minutes after.
    cache = Path(outcome.values["tmp"]) / "cache"
    written = sorted(p.name for p in cache.iterdir()) if cache.is_dir() else []
    assert "datasets" not in written and "models" not in written, written


EXTRA_CHECKS: dict[str, Callable[[Outcome, Setup], None]] = {
    "ask-atk-temperature-0-without-a-checkpoint-refused-before-any-data-loads-or-any-model-trains":
        _nothing_loaded_or_trained,
    "authors-ask-def-temperature-0-refused-before-the-dataset-loads": _nothing_loaded_or_trained,
    "finished-attack-run-other-settings-in-its-directory": _records_are_kept,
    "finished-training-rerun-with-another-learning-rate": _records_are_kept,
    "finished-attack-run-the-same-settings-again-nothing-to-do-nothing-rewritten": _records_are_kept,
    "loss-becomes-nan-after-a-good-epoch": _nan_run_keeps_its_last_good_epoch,
    "stale-feature-cache-from-another-checkpoint-detected-rebuilt-not-used": _stale_cache_is_rebuilt_not_used,
    "cached-auto-trained-model-damaged-retrained-not-refused": _damaged_model_is_retrained,
    "disk-full-ask-attack-its-run-lock-and-log": _full_disk_says_it_once,
    "disk-full-ask-train-its-run-lock-and-log": _full_disk_says_it_once,
    "eval-n-points-above-the-test-split-evaluates-all-of-it": _results_are_readable_by_the_group,
    "a-sweep-job-failed": _failed_sweep_still_ran_the_other_job,
    "reference-feature-cache-zeroed-in-place-detected-rebuilt-not-used": _zeroed_features_are_rebuilt_not_used,
    "dataset-image-replaced-by-one-of-the-same-size-after-it-was-cached-decoded-again": _replaced_image_is_decoded_again,
    "16-bit-greyscale-pngs-decoded-by-their-high-byte-not-clipped-to-white": _sixteen_bit_pixels_keep_their_high_byte,
}


# ------------------------------------------------------------------------ beside the table
@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_atomic_writes_follow_the_umask_not_mkstemps_0600(tmp_path: Path, mask: int) -> None:
    import torch

    from ask.utils.io import atomic_save, atomic_write_text, current_umask

    previous = os.umask(mask)
    try:
        assert current_umask() == mask
        written = [atomic_write_text(tmp_path / "metrics.json", "{}\n"),
                   atomic_save({"w": torch.zeros(2)}, tmp_path / "last.pt")]
    finally:
        os.umask(previous)
    for path in written:
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path


def test_a_write_that_fails_names_the_file_it_was_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from ask.errors import os_error_message
    from ask.utils.io import atomic_write_text

    def full_disk(fd: int) -> None:  # what a full disk makes fsync raise: ENOSPC, naming no file
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    target = tmp_path / "metrics.json"
    with pytest.raises(OSError) as raised:
        atomic_write_text(target, "{}\n")
    assert os_error_message(raised.value) == (
        f"no space left on the device holding '{target}'; free some space or point hydra.run.dir "
        "(or ASK_CACHE_DIR) at another disk")
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone too
