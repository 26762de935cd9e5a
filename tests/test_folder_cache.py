"""Image folders at scale: decoded pixels go straight to the cache files and come back as memory maps."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ask.config.schema import DatasetConfig
from ask.data import load_dataset
from tests.conftest import kill_when_it_prints

N_PER_CLASS, SIZE = 300, 128  # 1,200 images decoded to 3 x 128 x 128: 56 MiB of pixels


def _tree(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", N_PER_CLASS), ("val", 2)):
        for c in range(4):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for j in range(count):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{j:04d}.png")
    return root


_WORKER = textwrap.dedent("""
    import sys
    from PIL import Image, PngImagePlugin  # loaded before the baseline: not part of the data's cost
    from ask.config.schema import DatasetConfig
    from ask.data import load_dataset

    from ask.utils.memory import status_mib as status

    root, cache, use_cache = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    before = status("VmHWM")
    bundle = load_dataset(DatasetConfig(name="imagenette", root=root, image_size=128, cache=use_cache), cache, 0,
                          progress=False)
    print(status("VmHWM") - before, int(bundle.train.images.sum(dtype=__import__("torch").int64)))
""")


def _load_in_subprocess(root: Path, cache: Path, use_cache: bool) -> tuple[float, int]:
    done = subprocess.run([sys.executable, "-c", _WORKER, str(root), str(cache), "1" if use_cache else "0"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    peak, checksum = done.stdout.split()
    return float(peak), int(checksum)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for VmHWM")
def test_a_cached_folder_is_decoded_to_disk_and_mapped_not_held_in_ram(tmp_path: Path) -> None:
    root = _tree(tmp_path / "tree")
    pixels_mib = 4 * N_PER_CLASS * 3 * SIZE * SIZE / 2**20
    bound = pixels_mib / 4
    in_memory, checksum = _load_in_subprocess(root, tmp_path / "unused", use_cache=False)
    assert in_memory > pixels_mib, f"decoding into RAM peaked only {in_memory:.0f} MiB"
    built, built_checksum = _load_in_subprocess(root, tmp_path / "cache", use_cache=True)
    assert built < bound, f"the cached decode peaked {built:.0f} MiB above its start; bound {bound:.0f} MiB"
    loaded, loaded_checksum = _load_in_subprocess(root, tmp_path / "cache", use_cache=True)
    assert loaded < bound, f"loading the cache peaked {loaded:.0f} MiB; bound {bound:.0f} MiB"
    assert checksum == built_checksum == loaded_checksum  # same pixels in memory, as written, as mapped


def test_a_killed_decode_leaves_no_cache_and_the_next_build_cleans_up(tmp_path: Path) -> None:
    root = _tree(tmp_path / "tree")
    cache = tmp_path / "cache"
    script = textwrap.dedent(f"""
        import threading, time
        import ask.data.decoding as decoding
        from ask.config.schema import DatasetConfig
        from ask.data import load_dataset
        decode, count, lock = decoding.decode_image, [0], threading.Lock()
        def slow(path, size, short_side=None):
            with lock:
                count[0] += 1
                if count[0] == 500:
                    print("decoding", flush=True)
            if count[0] >= 500:
                time.sleep(60)
            return decode(path, size, short_side)
        decoding.decode_image = slow
        load_dataset(DatasetConfig(name="imagenette", root={str(root)!r}, image_size=32), {str(cache)!r}, 0,
                     progress=False)
    """)
    kill_when_it_prints(script, "decoding")
    (leftover,) = (cache / "datasets").iterdir()
    assert leftover.name.startswith(".imagenette-") and ".tmp-" in leftover.name  # never a usable cache

    bundle = load_dataset(DatasetConfig(name="imagenette", root=str(root), image_size=32), cache, 0, progress=False)
    (entry,) = (cache / "datasets").iterdir()  # the dead build's temporary directory was removed
    assert not entry.name.startswith(".") and len(bundle.train) == 4 * N_PER_CLASS
    assert np.array_equal(np.load(entry / "train-images.npy"), bundle.train.images.numpy())
