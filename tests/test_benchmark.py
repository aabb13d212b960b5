import subprocess
import sys

from conftest import ROOT


def test_benchmark_prints_device_commit_and_both_pipelines(tiny_data):
    command = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--data-dir", str(tiny_data), "--image-size", "64",
               "--batch-size", "8", "--steps", "2", "--reference-steps", "2", "--warmup", "1", "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("device: CPU") and "commit" in lines[1] and "throughput.py" in lines[2]
    assert "batch size 8, image size 64" in lines[3] and "decoding 48 training images" in lines[4]
    for name in ("train", "evaluate"):
        row = next(line for line in lines if line.startswith(name)).split()
        assert float(row[1]) > 0 and float(row[2]) > 0 and row[3].endswith("x")
