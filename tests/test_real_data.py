"""Real CIFAR-10 (the JPEG copy beside the project): unpacked by data.py, trained briefly, tested once."""
import json

import pytest

from conftest import SHARED_ARCHIVE, run

pytestmark = pytest.mark.skipif(not SHARED_ARCHIVE.is_file(), reason=f"{SHARED_ARCHIVE} is absent")


def test_brief_training_on_real_images_beats_chance(tmp_path):
    root = tmp_path / "cifar10"
    unpacked = run("data.py", "download", "--root", root, "--source", SHARED_ARCHIVE)
    assert "50000 training and 10000 test images in 10 classes" in unpacked.stdout
    out = tmp_path / "pretrain.pt"
    run("pretrain.py", "--data-dir", root, "--out", out, "--image-size", "64", "--limit", "4000", "--epochs", "3",
        "--lr", "0.03", "--batch-size", "64", "--device", "cpu")
    report = json.loads(out.with_suffix(".test.json").read_text())
    assert report["images"] == 10000  # the whole held-out test split, never seen in training or selection
    assert report["accuracy"] > 0.15, report["accuracy"]  # chance is 0.10; ~0.2 is typical for this budget
