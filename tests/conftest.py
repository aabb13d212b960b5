import hashlib
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"

def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs of the scripts (deselect with -m 'not slow')")


# Flags that keep a training run to seconds on the CPU.
QUICK = ["--image-size", "64", "--batch-size", "8", "--lr", "0.02", "--device", "cpu"]


def make_class_folders(root: Path, classes=("red", "green", "blue"), train=16, test=6, size=32, seed=0) -> Path:
    """train/ and test/ class folders of noisy images whose mean colour gives the class away."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("test", test)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            colour = np.zeros(3)
            colour[c % 3] = 200
            colour[(c // 3) % 3] += 55 * (c // 3)
            for i in range(count):
                pixels = np.clip(colour + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return root


def run(script: str, *args, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run a project script the way a user does, and return its output."""
    result = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                            cwd=kwargs.pop("cwd", ROOT), **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {args} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def error_line(result) -> str:
    """The last stderr line of a failed run (a progress bar may come before it),
    after checking there is no traceback."""
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def class_folder_archive(path: Path, tiny: Path, prefix: str = "cifar10/") -> None:
    """A .tar.gz or .zip of the class folders under `tiny`, nested in cifar10/ like the shared archive."""
    files = sorted(p for p in tiny.rglob("*.png"))
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w") as zf:
            for p in files:
                zf.write(p, prefix + str(p.relative_to(tiny)))
    else:
        with tarfile.open(path, "w:gz") as tar:
            for p in files:
                tar.add(p, prefix + str(p.relative_to(tiny)))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return make_class_folders(tmp_path_factory.mktemp("tiny") / "data")


@pytest.fixture(scope="session")
def pretrained(tiny_data, tmp_path_factory) -> Path:
    """A pretrain checkpoint from a few seconds of training on the tiny folders."""
    out = tmp_path_factory.mktemp("ckpt") / "pretrain.pt"
    run("pretrain.py", "--data-dir", tiny_data, "--out", out, "--epochs", "2", "--val-size", "6", *QUICK)
    return out
