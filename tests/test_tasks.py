import subprocess
import sys

import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.slow  # end to end: real processes and training

def invoke(*args, cwd):
    return subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(ROOT), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)


def test_tasks_are_listed(tmp_path):
    listing = invoke("--list", cwd=tmp_path).stdout
    for name in ("download", "pretrain", "finetune", "predict", "all", "bench", "headline", "test"):
        assert f"\n  {name} " in listing


def test_all_runs_the_whole_job(tiny_data, tmp_path):
    result = invoke("all", "--source", tiny_data, "--data-dir", tmp_path / "data", "--out-dir", tmp_path / "ck",
                    "--epochs", "1", "--image-size", "64", "--batch-size", "8", "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    outputs = ("pretrain.pt", "pretrain.csv", "pretrain.test.json", "finetune.pt", "finetune.test.json",
               "predictions.png")
    for name in outputs:
        assert (tmp_path / "ck" / name).is_file(), name
    assert torch.load(tmp_path / "ck" / "finetune.pt", weights_only=True)["stage"] == "finetune"
    assert "18 labelled images: accuracy" in result.stdout


def test_all_stops_at_the_first_failing_step(tmp_path):
    result = invoke("all", "--source", tmp_path / "missing", "--data-dir", tmp_path / "data",
                    "--out-dir", tmp_path / "ck", cwd=tmp_path)
    assert result.returncode != 0 and "no such file or folder" in result.stderr
    assert "pretrain.py" not in result.stdout + result.stderr and not (tmp_path / "ck").exists()


def test_finetune_task_passes_its_flags(tmp_path):
    result = invoke("--dry", "finetune", "--new-head", "--mode", "full", "--out-dir", "ck", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "finetune.py --out ck/finetune.pt --checkpoint ck/pretrain.pt --mode full --new-head" in result.stdout
