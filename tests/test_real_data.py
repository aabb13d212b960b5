"""Real CIFAR-10 (the JPEG copy beside the project): unpacked by download.py, trained briefly, tested once."""
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import SHARED_ARCHIVE, run

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not SHARED_ARCHIVE.is_file(), reason=f"{SHARED_ARCHIVE} is absent")]


def first_images(source: Path, target: Path, per_class: int) -> None:
    """Hard links to the first `per_class` images of each class folder: a smaller real data set, no copies."""
    for folder in sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith(".")):
        (target / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:per_class]:
            os.link(image, target / folder.name / image.name)


def test_brief_training_on_real_images_beats_chance(tmp_path, small_filesystem):
    # The 60,000 images in memory where a tmpfs can be mounted: creating them took 13 s of the test's 33 on this
    # project's disk, not the 1 s they take there.
    images = small_filesystem("512m", fallback=tmp_path)
    root = images / "cifar10"
    unpacked = run("download.py", "--root", root, "--source", SHARED_ARCHIVE)
    assert "50000 training and 10000 test images in 10 classes" in unpacked.stdout
    # A CPU trains AlexNet at ~200 images/s (its classifier costs the same at any image size): 2,000 real training
    # images and 1,000 real test images keep this to about half a minute.
    small = images / "small"
    first_images(root / "train", small / "train", 200)
    first_images(root / "test", small / "test", 100)
    shutil.rmtree(root)  # the other 57,000 images: not kept on the disk (or in memory) while training
    out = tmp_path / "pretrain.pt"
    run("pretrain.py", "--data-dir", small, "--out", out, "--image-size", "64", "--val-size", "200", "--epochs", "2",
        "--augment", "crop", "--lr", "0.03", "--batch-size", "32", "--device", "cpu")
    report = json.loads(out.with_suffix(".test.json").read_text())
    assert report["images"] == 1000  # the whole held-out test split, never seen in training or selection
    assert report["accuracy"] > 0.15, report["accuracy"]  # chance is 0.10 (5 standard errors below); ~0.19 measured
