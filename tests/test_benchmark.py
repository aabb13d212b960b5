import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, run

pytestmark = pytest.mark.slow  # end to end: real processes and training


def test_benchmark_without_data_is_one_line(tmp_path, monkeypatch):
    """Before: a traceback ending in data.NoDataFolder (or, with --device cuda and none there, in cli.UsageError)."""
    monkeypatch.syspath_prepend(ROOT / "benchmarks")  # throughput.py's folder, which a process of it has on its path
    result = run("benchmarks/throughput.py", "--data-dir", tmp_path / "no", "--device", "cpu", check=False,
                 cwd=tmp_path)
    assert (result.returncode, result.stderr.splitlines()[-1]) == (1, f"throughput.py: {tmp_path}/no/train: no such "
                                                                      "folder; expected a folder of class folders")
    assert "Traceback" not in result.stderr


def test_recipe_search_runs_each_recipe_and_tables_val_and_test(tiny_data, tmp_path):
    """Run from another folder than the project's, with paths relative to it (before: read from the project's)."""
    command = [sys.executable, str(ROOT / "benchmarks" / "recipes.py"),
               "--recipe", "slow=--lr 0.01", "--recipe", "bad=--lr -1", "--out-dir", "out",
               "--data-dir", os.path.relpath(tiny_data, tmp_path), "--epochs", "2", "--val-size", "6",
               "--image-size", "64", "--batch-size", "8", "--device", "cpu", "--hidden", "64,32"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    out = tmp_path / "out"
    assert result.returncode == 1, result.stderr  # one recipe failed
    lines = result.stdout.splitlines()
    assert lines[0].startswith("device: CPU") and "commit" in lines[1] and "recipes.py" in lines[2]
    assert "--epochs 2" in lines[3] and "--device cpu" in lines[3]
    report = json.loads((out / "slow.test.json").read_text())
    slow = next(line for line in lines if line.startswith("| slow |")).split(" | ")
    assert slow[1:3] == ["`--lr 0.01`", "2"] and slow[4] == f"{report['val_acc']:.2%} (epoch {report['epoch']})"
    assert slow[5] == f"{report['accuracy']:.2%} |"
    # the recipe's flags reached the run
    assert torch.load(out / "slow.pt", weights_only=True)["args"]["lr"] == 0.01
    bad = next(line for line in lines if line.startswith("| bad |"))
    assert "failed (exit 2)" in bad and "--lr: must be a positive number" in bad
    unknown = subprocess.run([*command[:2], "--recipe", "nope"], capture_output=True, text=True, cwd=ROOT)
    assert unknown.returncode == 2 and "no recipe 'nope'; known: reference" in unknown.stderr



@pytest.mark.parametrize("sig, group", [(signal.SIGINT, True), (signal.SIGTERM, False)], ids=["ctrl-c", "kill"])
def test_a_stopped_recipe_search_lets_its_run_save_its_resume_state(tiny_data, tmp_path, sig, group):
    """A Ctrl-C (or headline.py's SIGINT at its deadline) reaches the process group, pretrain.py too, which stops at its
    next step and saves its resume state; before, recipes.py's subprocess.run killed it 0.25 s later (SIGKILL): the
    run's log ended mid-epoch, its state unsaved, and recipes.py ended in a KeyboardInterrupt traceback. A `kill` of
    recipes.py alone: before, it said it waited for pretrain.py to save its state, which never heard of the stop and
    trained on to its last epoch, and further stops were ignored."""
    command = [sys.executable, str(ROOT / "benchmarks" / "recipes.py"), "--recipe", "r=--lr 0.01", "--out-dir", "out",
               "--data-dir", str(tiny_data), "--epochs", "1000", "--val-size", "6", "--image-size", "64",
               "--batch-size", "8", "--device", "cpu", "--hidden", "64,32"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                               start_new_session=True)
    log = tmp_path / "out" / "r.log"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (log.exists() and "  epoch 1/1000: " in log.read_text()):
        time.sleep(0.05)
    os.killpg(process.pid, sig) if group else process.send_signal(sig)
    try:
        _, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # still waiting for a pretrain.py training on: both ended, the test failed
        os.killpg(process.pid, signal.SIGKILL)
        raise
    assert process.returncode == (-sig if sig == signal.SIGINT else 128 + sig) and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith(f"recipes.py: stopped by {sig.name}; waiting for recipe r's ")
    assert log.read_text().strip().splitlines()[-1].startswith(f"pretrain.py: stopped by {sig.name} at ")
    assert (tmp_path / "out" / "r.last.pt").is_file()


def test_checkpoint_benchmark_times_each_save_and_counts_the_writes(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "checkpoint_writes.py"), "--epochs", "2",
               "--epoch-seconds", "0", "--out-dir", str(tmp_path), "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("device: CPU") and "commit" in lines[1] and "checkpoint_writes.py" in lines[2]
    assert lines[3] == "best checkpoint 178 MB, resume state 355 MB, every epoch"
    assert lines[4].startswith("epoch 1: save blocked") and lines[5].startswith("epoch 2: save blocked")
    assert "of 4 saves reached the disk" in lines[6] and "peak memory" in lines[6]
    assert list(tmp_path.iterdir()) == []  # its temporary folder is gone


def test_peak_memory_makes_a_set_and_measures_a_process_tree(tmp_path):
    script = str(ROOT / "benchmarks" / "peak_memory.py")
    subprocess.run([sys.executable, script, "--make-set", str(tmp_path / "s"), "--images", "40", "--size", "16",
                    "--test", "4"], check=True)
    assert len(list((tmp_path / "s" / "train" / "a").iterdir())) == 20 and len(list((tmp_path / "s" / "test").rglob(
        "*.png"))) == 4
    child = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'x = bytearray(300 << 20); import time; " \
            "time.sleep(0.5)']); sys.exit(3)"
    result = subprocess.run([sys.executable, script, "--", sys.executable, "-c", child], capture_output=True,
                            text=True)
    assert result.returncode == 3
    anonymous = int(result.stderr.split("peak anonymous ")[1].split()[0])
    assert anonymous >= 300 and "exit 3" in result.stderr  # the grandchild's 300 MiB counted
    killed = subprocess.run([sys.executable, script, "--", sys.executable, "-c", "import os, signal; "
                             "os.kill(os.getpid(), signal.SIGTERM)"], capture_output=True, text=True)
    assert killed.returncode == 128 + signal.SIGTERM and "exit 143" in killed.stderr  # before: -15, and Python's 241


def test_benchmark_refuses_a_training_runs_flag_it_would_ignore(monkeypatch, capsys):
    """Before: --epochs 3, --limit 100, --out x.pt were taken and ignored, as if the figures obeyed them."""
    monkeypatch.syspath_prepend(ROOT / "benchmarks")
    import throughput
    for flag, *value in (("--epochs", "3"), ("--limit", "100"), ("--out", "x.pt"), ("--val-size", "10"),
                         ("--resume", "x.last.pt"), ("--overwrite",)):
        with pytest.raises(SystemExit) as stopped:  # a step or two, were the flag taken: the test stays quick
            throughput.main(["--device", "cpu", "--steps", "1", "--warmup", "1", "--batch-size", "2", flag, *value])
        assert stopped.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1].endswith(  # argparse's prog is sys.argv[0]'s name
            f": error: {flag}: a training run's flag; throughput.py times --steps steps of --batch-size images and "
            "writes nothing")


def test_checkpoint_benchmark_with_a_missing_out_dir_is_one_line(tmp_path):
    """Before: a FileNotFoundError traceback from tempfile."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "checkpoint_writes.py"), "--out-dir",
                             str(tmp_path / "no"), "--device", "cpu"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (f"checkpoint_writes.py: error: --out-dir {tmp_path / 'no'}: cannot make "
                                              "a folder in it (No such file or directory); pass a writable folder")


def test_checkpoint_benchmark_on_cuda_where_there_is_none_is_one_line(tmp_path):
    """--device cuda on a machine without CUDA (hidden here, so on any machine): resolve_device's line, no traceback."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "checkpoint_writes.py"), "--out-dir",
                             str(tmp_path), "--device", "cuda"], capture_output=True, text=True, cwd=ROOT,
                            env=os.environ | {"CUDA_VISIBLE_DEVICES": ""})
    assert (result.returncode, result.stderr) == (1, "checkpoint_writes.py: --device cuda: CUDA is not available on "
                                                     "this machine; use --device auto or cpu\n")
    assert list(tmp_path.iterdir()) == []


def test_peak_memory_without_a_command_is_one_line():
    """Before: an IndexError traceback from subprocess.Popen([])."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peak_memory.py")], capture_output=True,
                            text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == ("peak_memory.py: error: pass --make-set DIR, or the command to measure "
                                              "after --")
