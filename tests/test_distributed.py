"""torchrun with 2 processes on the CPU (gloo): same results as 1 process, one checkpoint, resume, stop on any rank."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import ROOT, default_signals, make_class_folders, run, training_log

pytestmark = pytest.mark.slow  # end to end: real processes and training

# DDP changes only the dropout masks (each process draws its own); with these settings (a classifier 64 and 32 wide)
# the validation loss of 2 processes stays within 0.001 of 1 process over 3 epochs (measured), against ~0.01 moved by
# training.
VAL_LOSS_TOLERANCE = 0.003
FLAGS = ["--epochs", "3", "--val-size", "12", "--image-size", "64", "--batch-size", "16", "--lr", "0.01",
         "--device", "cpu", "--hidden", "64,32"]


@pytest.fixture(scope="module")
def data40(tmp_path_factory):
    root = make_class_folders(tmp_path_factory.mktemp("ddp") / "data", train=40, test=10)
    Image.new("RGB", (8, 8)).save(root / "train" / "red" / "party.gif")  # left out, with a warning
    return root


def torchrun(*args, nproc=2, **kwargs):
    """TMPDIR: the folder above --data-dir, the test's: torchrun leaves a torchelastic_* folder in the temporary one."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "pretrain.py"), *map(str, args)]
    scratch = Path(args[args.index("--data-dir") + 1]).parent
    shared = Path(os.environ["TMPDIR"])  # the session's temporary folder, which torchrun is not to be given
    before = set(shared.glob("torchelastic_*"))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               preexec_fn=default_signals, env=os.environ | {"TMPDIR": str(scratch)}, **kwargs)
    process.left_in_the_session = lambda: set(shared.glob("torchelastic_*")) - before
    return process


def finish(process, timeout=300):
    stdout, stderr = process.communicate(timeout=timeout)
    assert not process.left_in_the_session(), "torchrun left its folder in the session's temporary folder"
    return process.returncode, stdout, stderr


def history(out: Path) -> list[dict]:
    return training_log(out)


@pytest.fixture(scope="module")
def two_processes(data40, tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "pretrain.pt"
    code, stdout, stderr = finish(torchrun("--data-dir", data40, "--out", out, *FLAGS))
    assert code == 0, stderr
    yield out, stdout, stderr
    shutil.rmtree(out.parent)  # half a gigabyte of checkpoints: gone with the module, not at the session's end


def test_a_data_warning_is_said_once_not_by_every_process(two_processes):
    """Before: each process scanned the data folder and said its left-out .gif, 8 lines for 8 GPUs."""
    _, _, stderr = two_processes
    assert stderr.count("1 image file(s) left out") == 1, stderr


@pytest.mark.slow
def test_two_processes_match_one(data40, two_processes, tmp_path):
    out, stdout, _ = two_processes
    assert "on cpu x 2 processes" in stdout and stdout.count("epoch   1/3") == 1  # only the first process prints
    single = tmp_path / "pretrain.pt"
    run("pretrain.py", "--data-dir", data40, "--out", single, *FLAGS)
    for one, two in zip(history(single), history(out), strict=True):
        assert one["val_acc"] == two["val_acc"]
        assert abs(float(one["val_loss"]) - float(two["val_loss"])) < VAL_LOSS_TOLERANCE, (one, two)
    files = sorted(p.name for p in out.parent.iterdir())
    assert files == ["pretrain.confusion.png", "pretrain.csv", "pretrain.last.pt", "pretrain.png", "pretrain.pt",
                     "pretrain.test.json"]


@pytest.mark.slow
def test_torchrun_with_one_process_takes_the_distributed_path(data40, tmp_path):
    """What tests/test_cuda.py runs over NCCL on a machine of one GPU: here over gloo."""
    out = tmp_path / "pretrain.pt"
    code, stdout, stderr = finish(torchrun("--data-dir", data40, "--out", out, *FLAGS, "--epochs", "1", nproc=1))
    assert code == 0, stderr
    assert "on cpu x 1 processes (gloo)" in stdout
    assert not any(name.startswith("module.") for name in torch.load(out, weights_only=True)["model"])


@pytest.mark.slow
def test_the_checkpoint_has_no_wrapper_prefix_and_predicts(data40, two_processes):
    out, _, _ = two_processes
    checkpoint = torch.load(out, weights_only=True)
    assert not any(name.startswith(("module.", "_orig_mod.")) for name in checkpoint["model"])
    result = run("predict.py", data40 / "test", "--checkpoint", out, "--device", "cpu")
    assert "30 labelled images: accuracy" in result.stdout


def worker(parent: int, rank: int) -> int:
    """The pid of torchrun's worker process with this RANK."""
    for _ in range(600):
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent and \
                            f"RANK={rank}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                        return int(entry.name)
                except (OSError, IndexError):
                    continue
        time.sleep(0.05)
    raise AssertionError("no worker found")


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_and_resume_under_torchrun_is_exact(data40, two_processes, tmp_path):
    whole, _, _ = two_processes
    out = tmp_path / "pretrain.pt"
    process = torchrun("--data-dir", data40, "--out", out, *FLAGS)
    second = worker(process.pid, 1)
    for line in process.stderr:  # progress goes to stderr
        if line.startswith("  epoch 2/3: 16/108 images"):  # epoch 2's first step is done, six are left
            os.kill(second, signal.SIGTERM)
            break
    code, _, stderr = finish(process)
    assert code != 0
    assert re.search(r"stopped by SIGTERM at epoch 2, step [1-6];", stderr), stderr
    assert f"resume with: torchrun --nproc_per_node=2 {ROOT / 'pretrain.py'} --resume" in stderr  # as it was named
    code, stdout, stderr = finish(torchrun("--data-dir", data40, "--out", out, *FLAGS,
                                           "--resume", out.with_suffix(".last.pt")))
    assert code == 0, stderr
    assert "resuming pretrain" in stdout
    for suffix in (".pt", ".last.pt"):
        a = torch.load(whole.with_suffix(suffix), weights_only=True)["model"]
        b = torch.load(out.with_suffix(suffix), weights_only=True)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), suffix
    one = run("pretrain.py", "--resume", out.with_suffix(".last.pt"), "--epochs", "4", check=False)
    assert one.returncode == 1 and "the run had 2 processes, this has 1" in one.stderr


class FakeDistributed:
    """torch.distributed as one of two processes sees it, the default group on `backend`: each collective is
    recorded with its group and the device of its tensor, and the other process's stop flag is set."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.calls: list[tuple] = []

    def init_process_group(self, backend: str) -> None:
        pass

    def get_backend(self, group=None) -> str:
        return self.backend

    def new_group(self, backend: str) -> str:
        return f"new {backend} group"

    def all_reduce(self, tensor, op=None, group=None) -> None:
        self.calls.append(("all_reduce", tensor.device.type, group))
        tensor.fill_(1.0)

    def all_gather_object(self, gathered, obj, group=None) -> None:
        self.calls.append(("all_gather_object", group))
        gathered[:] = [obj] * len(gathered)

    def barrier(self, group=None) -> None:
        self.calls.append(("barrier", group))


@pytest.mark.parametrize("backend, host_group", [("nccl", "new gloo group"), ("gloo", None)])
def test_the_stop_flag_and_host_values_never_go_over_nccl(monkeypatch, backend, host_group):
    """Over NCCL a stop flag read back each step would wait for the GPU: it goes over a CPU (gloo) group."""
    import cli
    fake = FakeDistributed(backend)
    for name in ("init_process_group", "get_backend", "new_group", "all_reduce", "all_gather_object", "barrier"):
        monkeypatch.setattr(cli.dist, name, getattr(fake, name))
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)  # as torchrun sets them
    processes = cli.Processes("cpu")
    processes.device = torch.device("meta")  # stands for the GPU: the flag must not be read back from there
    assert processes.any(False) is True  # the other process got the signal
    assert processes.gather("rank 0") == ["rank 0", "rank 0"]
    processes.barrier()
    assert fake.calls == [("all_reduce", "cpu", host_group), ("all_gather_object", host_group),
                          ("barrier", host_group)]
