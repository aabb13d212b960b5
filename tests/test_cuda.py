"""On CUDA: the bf16 step (channels_last, fused SGD, compiled or not), a stop and resume, predict agreeing with the
CPU, an exported program checked and moved there, torchrun on NCCL, the out-of-memory message. Every test is skipped
without CUDA; benchmarks/headline.py runs them on a GPU."""
import json
import signal
import subprocess
import sys

import pytest
import torch

import cli
from conftest import ROOT, error_line, make_class_folders, run, start, stop_during
from model import AlexNet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CUDA = ["--image-size", "64", "--batch-size", "16", "--lr", "0.02", "--device", "cuda"]


@pytest.mark.parametrize("compiled", [[], ["--compile"]])
def test_bf16_steps_with_channels_last_and_the_fused_sgd(tiny_data, tmp_path, compiled):
    import pretrain
    args = pretrain.make_parser("", "pretrain").parse_args(["--device", "cuda"])
    model = AlexNet(num_classes=3)
    run_ = pretrain.start_run(args, "pretrain", cli.Processes("cuda"), model, list(model.parameters()), None)
    optimizer, bf16 = run_.optimizer, run_.bf16
    assert bf16 and optimizer.defaults["fused"] and model.features[0].weight.is_cuda and torch.backends.cudnn.benchmark
    assert model.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    out = tmp_path / "p.pt"
    result = run("pretrain.py", "--data-dir", tiny_data, "--out", out, "--epochs", "2", "--val-size", "6", *CUDA,
                 *compiled)
    assert "on cuda, bf16 autocast, channels_last, fused SGD (--precision auto)" in result.stdout
    assert ("compiled" in result.stdout) == bool(compiled)
    report = json.loads(out.with_suffix(".test.json").read_text())
    weights = torch.load(out, weights_only=True)["model"].values()  # where they were saved from: the CPU
    assert report["loss"] < 10 and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in weights)


def test_sigint_then_resume_on_cuda(tiny_data, tmp_path):
    out = tmp_path / "p.pt"
    flags = [*start(out, 5, tiny_data), "--device", "cuda"]  # epochs enough that the signal comes before the end
    message = stop_during("epoch 1/5", signal.SIGINT, flags)
    assert "stopped by SIGINT at " in message
    resumed = run("pretrain.py", "--resume", out.with_suffix(".last.pt"))
    assert "resuming pretrain" in resumed.stdout and "epoch   5/5" in resumed.stdout
    assert torch.load(out.with_suffix(".last.pt"), weights_only=True)["epoch"] == 5


def test_predict_on_cuda_agrees_with_the_cpu(pretrained, tiny_data):
    top1 = {}
    for device in ("cpu", "cuda"):
        result = run("predict.py", tiny_data / "test", "--checkpoint", pretrained, "--json", "--device", device)
        top1[device] = [p["top"][0]["label"] for p in json.loads(result.stdout)["predictions"]]
    assert top1["cuda"] == top1["cpu"] and len(top1["cpu"]) == 18


def test_an_export_checked_on_cuda_and_a_cpu_program_predicting_on_cuda(pretrained, tiny_data, tmp_path):
    run("export.py", "--checkpoint", pretrained, "--out", tmp_path / "cuda.pt2", "--device", "cuda",
        "--data-dir", tiny_data)  # fails unless the program agrees with the checkpoint on CUDA
    run("export.py", "--checkpoint", pretrained, "--out", tmp_path / "cpu.pt2", "--device", "cpu", "--limit", "4")
    top1 = {}
    for path, device in ((pretrained, "cpu"), (tmp_path / "cpu.pt2", "cuda")):
        result = run("predict.py", tiny_data / "test", "--checkpoint", path, "--json", "--device", device)
        top1[device] = [p["top"][0]["label"] for p in json.loads(result.stdout)["predictions"]]
    assert top1["cuda"] == top1["cpu"] and len(top1["cpu"]) == 18
    timed = run("benchmarks/latency.py", "--checkpoint", pretrained, "--program", tmp_path / "cuda.pt2", "--runs", "1",
                "--batch-runs", "1", "--warmup", "1", "--batch-size", "2", process=True)  # checked on the CPU
    assert "| cuda | exported |" in timed.stdout


def test_torchrun_with_one_process_trains_over_nccl(tiny_data, tmp_path):
    out = tmp_path / "p.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               str(ROOT / "pretrain.py"), "--data-dir", str(tiny_data), "--out", str(out), "--epochs", "1",
               "--val-size", "6", *CUDA]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "on cuda:0 x 1 processes (nccl)" in result.stdout
    assert not any(name.startswith("module.") for name in torch.load(out, weights_only=True)["model"])


def test_an_absurd_batch_is_the_out_of_gpu_memory_line(tmp_path):
    """13,500 training images at 1,024 px are 170 GB as float32 before the first layer: more than a GPU holds."""
    images = make_class_folders(tmp_path / "data", train=5000, test=2, size=8)
    result = run("pretrain.py", "--data-dir", images, "--out", tmp_path / "p.pt", "--epochs", "1",
                 "--image-size", "1024", "--batch-size", "20000", "--device", "cuda", process=True, check=False)
    assert "pretrain.py: out of GPU memory with --batch-size 20000; pass a smaller --batch-size" in error_line(result)
