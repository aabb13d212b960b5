"""Closed pipes, hang-ups, full disks and concurrent runs: ordinary events, each met with the real fault."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import data
import pretrain
from conftest import QUICK, ROOT, error_line, run
from model import load_checkpoint
from predict import UsageError


def test_side_files_belong_to_one_out():
    names = {out: [p.name for p in pretrain.side_files(Path(out)).values()]
             for out in ("pretrain.pt", "run.pth", "exp.1", "exp.2")}
    assert names == {"pretrain.pt": ["pretrain.last.pt", "pretrain.csv", "pretrain.test.json"],
                     "run.pth": ["run.last.pt", "run.csv", "run.test.json"],
                     "exp.1": ["exp.1.last.pt", "exp.1.csv", "exp.1.test.json"],
                     "exp.2": ["exp.2.last.pt", "exp.2.csv", "exp.2.test.json"]}


def test_outs_that_share_side_files_share_their_lock(tmp_path):
    """run.pt and run both write run.last.pt: one of them at a time."""
    with pretrain.OutLock(tmp_path / "run.pt"):
        with pytest.raises(UsageError, match="another run .* is writing it"):
            pretrain.OutLock(tmp_path / "run")
        pretrain.OutLock(tmp_path / "run.2").__exit__()


@pytest.mark.slow
def test_two_outs_that_differ_after_the_last_dot_keep_their_own_files(tiny_data, tmp_path):
    for out in ("exp.1", "exp.2"):
        result = run("pretrain.py", "--data-dir", tiny_data, "--out", tmp_path / out, "--epochs", "1",
                     "--val-size", "6", "--seed", out[-1], *QUICK)
        assert f"{tmp_path / out}.last.pt (resume state), {tmp_path / out}.csv" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"exp.{i}{suffix}" for i in (1, 2) for suffix in ("", ".csv", ".last.pt", ".test.json")]
    assert [load_checkpoint(tmp_path / f"exp.{i}.last.pt")["args"]["seed"] for i in (1, 2)] == [1, 2]


@pytest.mark.slow
def test_a_fresh_run_onto_a_finished_run_is_refused_unless_overwrite(tiny_data, tmp_path):
    out = tmp_path / "p.pt"
    flags = ["--data-dir", tiny_data, "--out", out, "--epochs", "1", "--val-size", "6", *QUICK]
    run("pretrain.py", *flags)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    result = run("pretrain.py", *flags, check=False)
    assert error_line(result) == (
        f"pretrain.py: --out {out}: {out} and {tmp_path}/p.last.pt exist already, from an earlier run; continue it "
        f"with pretrain.py --resume {tmp_path}/p.last.pt (a larger --epochs trains further), choose another --out, or "
        "pass --overwrite to replace it")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before and "epoch" not in result.stdout
    (tmp_path / "p.last.pt").unlink()
    result = run("pretrain.py", *flags, check=False)
    assert error_line(result).endswith(f"{out} exists already, from an earlier run; choose another --out, or pass "
                                       "--overwrite to replace it")
    again = run("pretrain.py", *flags, "--overwrite")
    assert "epoch   1/1" in again.stdout and (tmp_path / "p.last.pt").exists()


WRITER = """
import sys, time
sys.path.insert(0, {root!r})
import data
def write(f):
    f.write(b"x" * 1000)
    time.sleep(0.01)  # the other writer starts meanwhile
for i in range(40):
    data.write_atomically({path!r}, write)
"""


@pytest.mark.slow
def test_concurrent_writers_of_one_path_never_remove_each_others_temporary_file(tmp_path):
    """Two predict.py --grid of one picture, two runs building one cache: before, one failed or warned."""
    path = tmp_path / "same.png"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER.format(root=str(ROOT), path=str(path))],
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for writer in writers:
        _, stderr = writer.communicate(timeout=120)
        assert writer.returncode == 0, stderr
    assert os.listdir(tmp_path) == ["same.png"]


def test_a_dead_writers_temporary_file_is_removed_a_running_ones_kept(tmp_path):
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    try:
        for pid in (alive.pid, dead.pid):
            (tmp_path / f".c.pt.{pid}-abcd1234.tmp").write_bytes(b"half")
        (tmp_path / f".c.pt.1.{dead.pid}-abcd1234.tmp").write_bytes(b"c.pt.1's")  # another file's
        data.write_atomically(tmp_path / "c.pt", lambda f: f.write(b"new"))
        assert sorted(os.listdir(tmp_path)) == sorted([f".c.pt.{alive.pid}-abcd1234.tmp", "c.pt",
                                                       f".c.pt.1.{dead.pid}-abcd1234.tmp"])
    finally:
        alive.kill()
        alive.wait()
