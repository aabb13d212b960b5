"""Closed pipes, hang-ups, full disks and concurrent runs: ordinary events, each met with the real fault."""
import contextlib
import errno
import io
import json
import multiprocessing
import os
import pty
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import cli
import data
import predict
import pretrain
from conftest import (QUICK, QUICK_NO_HIDDEN, ROOT, default_signals, error_line, make_class_folders, run,
                      stopped_status)
from model import load_checkpoint
from cli import UsageError


def test_side_files_belong_to_one_out():
    names = {out: [p.name for p in pretrain.side_files(Path(out)).values()]
             for out in ("pretrain.pt", "run.pth", "exp.1", "exp.2")}
    ends = [".last.pt", ".csv", ".test.json", ".png", ".confusion.png"]
    assert names == {"pretrain.pt": ["pretrain" + end for end in ends], "run.pth": ["run" + end for end in ends],
                     "exp.1": ["exp.1" + end for end in ends], "exp.2": ["exp.2" + end for end in ends]}


def test_outs_that_share_side_files_share_their_lock(tmp_path):
    """run.pt and run both write run.last.pt: one of them at a time."""
    with pretrain.out_lock(tmp_path / "run.pt"):
        with pytest.raises(UsageError, match="another run .* is writing it"):
            pretrain.out_lock(tmp_path / "run")
        with pretrain.out_lock(tmp_path / "run.2"):  # another run name: its own lock
            pass


@pytest.mark.slow
def test_two_outs_that_differ_after_the_last_dot_keep_their_own_files(tiny_data, tmp_path):
    for out in ("exp.1", "exp.2"):
        result = run("pretrain.py", "--data-dir", tiny_data, "--out", tmp_path / out, "--epochs", "1",
                     "--val-size", "6", "--seed", out[-1], *QUICK)
        assert f"{tmp_path / out}.last.pt (resume state), {tmp_path / out}.csv" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"exp.{i}{suffix}" for i in (1, 2)
        for suffix in ("", ".confusion.png", ".csv", ".last.pt", ".png", ".test.json")]
    assert [load_checkpoint(tmp_path / f"exp.{i}.last.pt")["args"]["seed"] for i in (1, 2)] == [1, 2]


@pytest.mark.slow
def test_a_fresh_run_onto_a_finished_run_is_refused_unless_overwrite(tiny_data, tmp_path):
    out = tmp_path / "p.pt"
    flags = ["--data-dir", tiny_data, "--out", out, "--epochs", "1", "--val-size", "6", *QUICK]
    run("pretrain.py", *flags)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    result = run("pretrain.py", *flags, check=False)
    assert error_line(result) == (
        f"pretrain.py: --out {out}: {out}, {tmp_path}/p.last.pt, {tmp_path}/p.csv, {tmp_path}/p.test.json, "
        f"{tmp_path}/p.png and {tmp_path}/p.confusion.png exist already, from an earlier run; continue it "
        f"with python pretrain.py --resume {tmp_path}/p.last.pt (a larger --epochs trains further), choose another "
        "--out, or pass --overwrite to replace it")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before and "epoch" not in result.stdout
    for name in ("p.last.pt", "p.csv", "p.test.json", "p.png", "p.confusion.png"):
        (tmp_path / name).unlink()
    result = run("pretrain.py", *flags, check=False)
    assert error_line(result).endswith(f"{out} exists already, from an earlier run; choose another --out, or pass "
                                       "--overwrite to replace it")
    again = run("pretrain.py", *flags, "--overwrite")
    assert "epoch   1/1" in again.stdout and (tmp_path / "p.last.pt").exists()


def write_often(path: Path) -> None:
    """A writer process: a second of atomic writes of one path, each slow enough for the other's to overlap it."""
    def write(f):
        f.write(b"x" * 1000)
        time.sleep(0.01)

    for _ in range(100):
        cli.write_atomically(path, write)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["exp.csv", "exp.test.json"])
def test_a_users_own_file_named_like_a_runs_log_or_report_is_never_replaced(tiny_data, tmp_path, name):
    """Before: only exp.pt and exp.last.pt were protected; a fresh run replaced the user's exp.csv or exp.test.json."""
    (tmp_path / name).write_text("mine")
    result = run("pretrain.py", "--data-dir", tiny_data, "--out", tmp_path / "exp.pt", "--epochs", "1", *QUICK,
                 check=False)
    assert error_line(result) == (f"pretrain.py: --out {tmp_path}/exp.pt: {tmp_path}/{name} exists already, from an "
                                  "earlier run; choose another --out, or pass --overwrite to replace it")
    assert (tmp_path / name).read_text() == "mine" and os.listdir(tmp_path) == [name]


def test_concurrent_writers_of_one_path_never_remove_each_others_temporary_file(tmp_path):
    """Two predict.py --grid of one picture, two runs building one cache: before, one failed or warned."""
    path = tmp_path / "same.png"
    # forked: two processes (each its own pid in its temporary files' names) without a new Python importing torch
    writers = [multiprocessing.get_context("fork").Process(target=write_often, args=(path,)) for _ in range(2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
        assert writer.exitcode == 0  # an exception's traceback is on stderr
    assert os.listdir(tmp_path) == ["same.png"]


class InterruptedFile(io.RawIOBase):
    """A file a Ctrl-C interrupts once `after` bytes are written: the signal's KeyboardInterrupt raised in a write."""

    def __init__(self, file, after: int) -> None:
        self.file, self.left = file, after

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.left -= len(data)
        if self.left < 0:
            raise KeyboardInterrupt
        return self.file.write(data)


def test_a_ctrl_c_while_torch_saves_is_a_keyboard_interrupt_and_leaves_no_file(tmp_path):
    """torch.save wraps it in a RuntimeError ("unexpected pos"): before, a Ctrl-C while a run wrote its final
    checkpoint was that traceback and exit 1, not the stop's line."""
    with pytest.raises(KeyboardInterrupt):
        cli.write_atomically(tmp_path / "c.pt", lambda f: torch.save({"x": torch.zeros(10**6)},
                                                                     InterruptedFile(f, 10**5)))
    assert os.listdir(tmp_path) == []


def test_a_dead_writers_temporary_file_is_removed_a_running_ones_kept(tmp_path):
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    try:
        for pid in (alive.pid, dead.pid):
            (tmp_path / f".c.pt.{pid}-abcd1234.tmp").write_bytes(b"half")
        (tmp_path / f".c.pt.1.{dead.pid}-abcd1234.tmp").write_bytes(b"c.pt.1's")  # another file's
        cli.write_atomically(tmp_path / "c.pt", lambda f: f.write(b"new"))
        assert sorted(os.listdir(tmp_path)) == sorted([f".c.pt.{alive.pid}-abcd1234.tmp", "c.pt",
                                                       f".c.pt.1.{dead.pid}-abcd1234.tmp"])
    finally:
        alive.kill()
        alive.wait()


# ---------------------------------------------------------------- stdout closed, or on a full disk

def script(name: str, *args) -> list[str]:
    return [sys.executable, str(ROOT / name), *map(str, args)]


def closed_pipe_run(command: list[str]) -> subprocess.CompletedProcess:
    """Run with stdout a pipe whose reader has gone (`| head` after its lines): every write meets EPIPE."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()
    stderr = process.stderr.read()
    process.wait(timeout=600)
    return subprocess.CompletedProcess(command, process.returncode, "", stderr)


def filled(disk: Path) -> Path:
    """Fill the filesystem at `disk` to its last byte; returns the file that fills it."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:  # unbuffered: closing it has nothing left to write
        with pytest.raises(OSError, match="No space left"):
            while True:
                f.write(b"\0" * 65536)
    return filler


def test_a_flush_into_a_closed_pipe_is_a_loss_not_an_error():
    """What a write left buffered fails at the flush (print's flush=True, Python's at exit): kept in `lost`, and the
    descriptor then points at /dev/null, so the next flush does not fail again."""
    read, write = os.pipe()
    stream = open(write, "w")
    output = cli.Output(stream)
    output.write("a line the reader never reads\n")  # buffered: the write itself succeeds
    os.close(read)
    output.flush()
    assert isinstance(output.lost, BrokenPipeError)
    output.write("more\n")
    output.flush()
    stream.close()


@pytest.mark.slow
def test_predict_into_a_closed_pipe_exits_quietly(pretrained, tiny_data, tmp_path):
    result = closed_pipe_run(script("predict.py", tiny_data / "test", "--checkpoint", pretrained, "--device", "cpu"))
    assert result.returncode == 128 + signal.SIGPIPE and result.stderr == "", result.stderr
    result = closed_pipe_run(script("predict.py", tiny_data / "test", "--checkpoint", pretrained, "--device", "cpu",
                                    "--grid", tmp_path / "grid.png"))  # the picture is still drawn
    assert result.returncode == 128 + signal.SIGPIPE and result.stderr == f"wrote {tmp_path}/grid.png (18 images)\n"
    assert Image.open(tmp_path / "grid.png").size[0] > 0


@pytest.mark.slow
def test_predict_stops_at_the_first_failed_write_into_a_closed_pipe(pretrained, tmp_path):
    """`predict.py many | head -1`: before, every image was decoded and predicted after head had gone."""
    for i in range(3):
        Image.new("RGB", (32, 32), "red").save(tmp_path / f"{i}.png")
    (tmp_path / "z.png").write_bytes(b"not an image")  # reached only if the pass goes on past the first batch
    result = closed_pipe_run(script("predict.py", tmp_path, "--checkpoint", pretrained, "--device", "cpu",
                                    "--batch-size", "1"))
    assert result.returncode == 128 + signal.SIGPIPE and result.stderr == "", result.stderr
    grid = tmp_path / "grid" / "g.png"  # asked for a picture, the pass goes on to the last image
    result = closed_pipe_run(script("predict.py", tmp_path, "--checkpoint", pretrained, "--device", "cpu",
                                    "--batch-size", "1", "--grid", grid))
    assert result.returncode == 128 + signal.SIGPIPE, result.stderr
    assert "z.png: cannot read this image" in result.stderr and f"wrote {grid} (3 images)" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_stops_predict_with_one_line(pretrained, tmp_path, sig):
    """Before: exit 1 at Ctrl-C, a failure's status: whoever ran it could not tell an interrupt from an error; killed
    at once by SIGTERM or SIGHUP, without a line (export.py, the same code, left its temporary file)."""
    for i in range(1000):  # a pass of seconds, a batch each: it is under way when the signal comes
        Image.new("RGB", (32, 32), "red").save(tmp_path / f"{i:04d}.png")
    process = subprocess.Popen(script("predict.py", tmp_path, "--checkpoint", pretrained, "--device", "cpu",
                                      "--batch-size", "1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=default_signals)
    process.stdout.readline()  # the first image's line: the pass is under way
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == stopped_status(sig) and "Traceback" not in stderr, stderr
    assert stderr.splitlines()[-1] == "predict.py: interrupted; nothing more was saved"


@pytest.mark.slow
def test_training_into_a_closed_pipe_goes_on_and_says_so(tiny_data, tmp_path):
    out = tmp_path / "p.pt"
    result = closed_pipe_run(script("pretrain.py", "--data-dir", tiny_data, "--out", out, "--epochs", "2",
                                    "--val-size", "6", *QUICK))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert (f"pretrain.py: cannot write to stdout any more (Broken pipe); training goes on, each epoch is logged in "
            f"{tmp_path}/p.csv") in result.stderr.splitlines()
    assert len(load_checkpoint(tmp_path / "p.last.pt")["history"]) == 2 and (tmp_path / "p.test.json").exists()


@pytest.mark.slow
def test_predict_onto_a_full_disk_is_one_line_and_keeps_none_of_its_results(pretrained, tiny_data, small_filesystem):
    disk = small_filesystem("256k")
    results = disk / "results.tsv"
    earlier = "an earlier line" + " " * 4080 + "\n"  # a page: the results need another
    results.write_text(earlier)
    filled(disk)
    with open(results, "a") as stdout:  # `>> results.tsv`
        result = subprocess.run(script("predict.py", tiny_data / "test", "--checkpoint", pretrained, "--device",
                                       "cpu"), stdout=stdout, stderr=subprocess.PIPE, text=True)
    assert error_line(result) == ("predict.py: cannot write the results to stdout (No space left on device); none "
                                  "were kept: free space, or send them elsewhere")
    assert results.read_text() == earlier


@pytest.mark.slow
def test_training_with_stdout_on_a_full_disk_goes_on_and_says_so(tiny_data, tmp_path, small_filesystem):
    disk = small_filesystem("256k")
    filled(disk)
    with open(disk / "log", "w") as stdout:  # `> log`
        result = subprocess.run(script("pretrain.py", "--data-dir", tiny_data, "--out", tmp_path / "p.pt", "--epochs",
                                       "1", "--val-size", "6", *QUICK), stdout=stdout, stderr=subprocess.PIPE,
                                text=True)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "pretrain.py: cannot write to stdout any more (No space left on device); training goes on" in result.stderr
    assert (tmp_path / "p.test.json").exists()


def test_a_download_with_stdout_on_a_full_disk_says_its_line_is_lost(tiny_data, tmp_path, small_filesystem):
    disk = small_filesystem("256k")
    filled(disk)
    with open(disk / "log", "w") as stdout:  # `> log`
        result = subprocess.run(script("download.py", "--root", tmp_path / "c", "--source", tiny_data),
                                stdout=stdout, stderr=subprocess.PIPE, text=True)
    assert result.returncode == 0 and result.stderr.splitlines()[-1] == (
        f"download.py: cannot write to stdout any more (No space left on device); its lines are lost, the data set is "
        f"written: {tmp_path}/c"), result.stderr  # before: nothing said
    assert (tmp_path / "c" / "train").is_dir()


@pytest.mark.parametrize("stdout", ["a closed pipe", "closed"])
def test_a_download_whose_stdout_is_a_closed_pipe_or_closed_says_nothing_of_it(tiny_data, tmp_path, stdout):
    """`download.py | head`, `download.py >&-`: its lines were not wanted, so their loss is not said (only a full
    disk's or a hang-up's is)."""
    command = script("download.py", "--root", tmp_path / "c", "--source", tiny_data)
    if stdout == "a closed pipe":
        result = closed_pipe_run(command)
    else:
        result = subprocess.run(command, stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.close(1))
    assert (result.returncode, result.stderr) == (0, "") and (tmp_path / "c" / "train").is_dir()


@pytest.mark.slow
def test_an_export_with_stdout_on_a_full_disk_says_its_line_is_lost(pretrained, tiny_data, tmp_path,
                                                                      small_filesystem):
    disk = small_filesystem("256k")
    filled(disk)
    with open(disk / "log", "w") as stdout:  # `> log`
        result = subprocess.run(script("export.py", "--checkpoint", pretrained, "--out", tmp_path / "m.pt2",
                                       "--device", "cpu", "--data-dir", tiny_data), stdout=stdout,
                                stderr=subprocess.PIPE, text=True)
    assert result.returncode == 0 and result.stderr.splitlines()[-1] == (
        f"export.py: cannot write to stdout any more (No space left on device); its lines are lost, the agreement's "
        f"figures are in the record {tmp_path}/m.pt2.json"), result.stderr  # before: nothing said
    assert "check" in json.loads((tmp_path / "m.pt2.json").read_text())


def test_out_on_a_completely_full_disk_is_one_line_and_leaves_no_lock(tiny_data, small_filesystem):
    disk = small_filesystem("256k")
    filled(disk)
    result = run("pretrain.py", "--data-dir", tiny_data, "--out", disk / "p.pt", "--epochs", "1", *QUICK,
                 check=False)
    assert error_line(result) == (f"pretrain.py: --out {disk}/p.pt: cannot write its lock file {disk}/.p.lock (No "
                                  "space left on device); free disk space, or choose another --out")
    assert os.listdir(disk) == ["filler"]


@pytest.mark.slow
def test_a_disk_that_fills_at_the_first_resume_state_says_to_start_again_with_overwrite(tiny_data, small_filesystem):
    """Room for the first best checkpoint (12 MB with QUICK's widths), not for the resume state written after it (24
    MB): --out is left alone, no state to resume, and the same command is refused for it (an earlier run's file); the
    line says so (before: "free disk space, or choose a writable --out", and "the previous one", of no file)."""
    disk = small_filesystem("64m")
    filler = disk / "filler"
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(disk).free - 18 * 2**20)
    command = ("pretrain.py", "--data-dir", tiny_data, "--out", disk / "p.pt", "--epochs", "1", "--val-size", "6",
               *QUICK)
    result = run(*command, check=False)
    assert error_line(result) == (f"pretrain.py: {disk}/p.last.pt: cannot write the checkpoint (No space left on "
                                  "device); no part of it was left: free disk space, then start again with --overwrite")
    assert sorted(os.listdir(disk)) == ["filler", "p.pt"]
    filler.unlink()
    run(*command, "--overwrite")
    assert load_checkpoint(disk / "p.pt")["epoch"] == 1


@pytest.mark.slow
def test_a_disk_that_fills_once_a_resume_state_is_saved_says_to_resume(tiny_data, small_filesystem):
    """Room for the first epoch's files, not for the second's beside them: the line says to resume, which continues
    the run (before: "free disk space, or choose a writable --out", a fresh run's advice, which lost the epoch)."""
    disk = small_filesystem("64m")
    filler = disk / "filler"
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(disk).free - 44 * 2**20)
    result = run("pretrain.py", "--data-dir", tiny_data, "--out", disk / "p.pt", "--epochs", "2", "--val-size", "6",
                 *QUICK, check=False)
    line = error_line(result)  # the resume state is written in the background as the log and curves are: any
    assert re.fullmatch(rf"pretrain\.py: {disk}/p\.((last\.)?pt: cannot write the checkpoint|png: cannot write the "
                        r"learning curves|csv: cannot write the training log) \(No space left on device\); the "
                        rf"previous one is untouched: free disk space, then resume with: .*pretrain\.py --resume "
                        rf"{disk}/p\.last\.pt", line), line
    filler.unlink()
    run("pretrain.py", "--resume", disk / "p.last.pt")
    assert len(load_checkpoint(disk / "p.last.pt")["history"]) == 2 and (disk / "p.test.json").exists()


# ---------------------------------------------------------------- signals


def stop_with(signals: list[signal.Signals], args: list, gap: float = 0.0) -> subprocess.CompletedProcess:
    """pretrain.py, sent `signals` `gap` seconds apart once its first epoch shows progress."""
    process = subprocess.Popen(script("pretrain.py", *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=default_signals)
    for line in process.stderr:
        if line.startswith("  epoch 1/"):
            break
    for sig in signals:
        process.send_signal(sig)
        time.sleep(gap)
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


def stopped_as_it_forks(tmp_path, sig: signal.Signals, name: str, work: str) -> subprocess.CompletedProcess:
    """A script `name` whose `work` (lines of Python) forks, sent `sig` by an os.fork hook as each fork ends in the
    parent: it must stop as at any other moment, one line, no "Exception ignored"."""
    program = tmp_path / name
    program.write_text(f"""
import os, signal, sys, time
sys.path.insert(0, {str(ROOT)!r})
import cli, data

def work():
    os.register_at_fork(after_in_parent=lambda: os.kill(os.getpid(), {int(sig)}))
{textwrap.indent(work, "    ")}

if __name__ == "__main__":
    cli.run_script(lambda: cli.report_errors({name!r}, 1, work))
""")
    result = subprocess.run([sys.executable, str(program)], capture_output=True, text=True, timeout=120,
                            preexec_fn=default_signals)
    assert result.returncode == stopped_status(sig), (result.stdout, result.stderr)
    assert "Exception ignored" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"{name}: interrupted; nothing more was saved"
    return result


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "register_at_fork"), reason="needs fork")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_arriving_as_the_script_forks_still_stops_it(tmp_path, sig):
    """A signal that arrives while the script forks (a decoding pool starting its processes) is handled in an os.fork
    hook (logging's, after_in_parent), where Python drops an exception as "Exception ignored": the stop was lost, the
    stop signals then ignored, and the run trained on to its end, deaf to every further Ctrl-C and SIGTERM (found
    with SIGTERM while the image cache was decoded). A hook that sends the signal as the fork ends makes it certain."""
    result = stopped_as_it_forks(tmp_path, sig, "forks.py", "if os.fork() == 0:\n    os._exit(0)\nos.wait()\n"
                                 "time.sleep(2)\nprint('went on')")
    assert "went on" not in result.stdout


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "register_at_fork") or data.WORKERS < 2, reason="needs fork and 2 cores")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_as_the_decoding_pool_forks_stops_the_decoding_cleanly(tmp_path, sig):
    """The signal comes as the image cache's decoding pool forks its first process: held until the pool has started
    (before: dropped in logging's fork hook, the run went on deaf to signals; re-raised at once in the pool's start,
    the exit waited forever for processes no thread would end). Found with SIGTERM while the cache was decoded."""
    folders = make_class_folders(tmp_path / "data", train=100, test=2, size=8)
    result = stopped_as_it_forks(tmp_path, sig, "decodes.py", f"data.load_folder({str(folders / 'train')!r})\n"
                                 "print('decoded')")
    assert "decoded" not in result.stdout
    assert not [name for name in os.listdir(folders / ".cache") if name.endswith(".tmp")]


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")
@pytest.mark.parametrize("fails", [False, True])
def test_stop_signals_held_in_a_block_come_after_it_the_last_once(fails):
    """cli.stops_held: nothing reaches the handler during the block; after it (also when it raised), the last of the
    held signals, once: a second signal ends a run as itself (a Ctrl-C after a SIGHUP, as a Ctrl-C)."""
    # all three, not cli.stop_signals(): a suite started with `&` ignores SIGINT, which stop_signals then leaves out
    received, saved = [], {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        for sig in saved:
            signal.signal(sig, lambda signum, frame: received.append(signum))
        with contextlib.suppress(RuntimeError), cli.stops_held():
            for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
                signal.raise_signal(sig)
            assert received == []
            if fails:
                raise RuntimeError("the block failed")
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert received == [signal.SIGINT]


@pytest.mark.slow
def test_sighup_stops_like_sigint_with_the_resume_state_saved(tiny_data, tmp_path):
    """The terminal closed, or an ssh connection dropped: before, the run died mid-write, leaving a temporary file."""
    data = make_class_folders(tmp_path / "data", train=40, size=8)
    out = tmp_path / "ck" / "p.pt"
    result = stop_with([signal.SIGHUP], ["--data-dir", data, "--out", out, "--epochs", "2", "--val-size", "6",
                                         *QUICK])
    assert result.returncode == 128 + signal.SIGHUP, result.stderr
    assert "pretrain.py: stopped by SIGHUP at epoch 1, step" in error_line(result)
    assert sorted(os.listdir(out.parent)) == ["p.last.pt"] and load_checkpoint(out.parent / "p.last.pt")["step"] > 0


def test_a_scripts_work_run_from_a_program_leaves_its_signal_handling_as_it_was():
    """report_errors (every main()) is a library's too: an earlier version left SIGINT and SIGTERM ignored and
    sys.excepthook replaced in the caller's process after a Ctrl-C, and failed in a thread (signals: main thread only);
    what a script's process does at its end is cli.run_script's."""
    def handlers():
        return {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}, sys.excepthook
    before = handlers()

    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as stopped:
        cli.report_errors("x.py", 1, interrupted)
    assert stopped.value.code == 128 + signal.SIGINT and handlers() == before
    results = []
    thread = threading.Thread(target=lambda: results.append(cli.report_errors("x.py", 1, lambda: 7)))
    thread.start()
    thread.join()
    assert results == [7]


def test_a_stop_signal_off_the_main_thread_installs_no_handler():
    """Python takes handlers in the main thread only: before, pretrain.main() in a program's thread failed there."""
    errors = []

    def body():
        try:
            with cli.StopSignal():
                pass
        except ValueError as e:
            errors.append(e)
    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert errors == []


def test_a_stop_signal_is_ignored_once_received_and_the_handler_put_back_otherwise():
    """Ignored in a script's process (cli.run_script's handlers), put back in a program calling main()."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        signal.signal(signal.SIGTERM, cli.interrupt)  # as cli.run_script has it
        with cli.StopSignal():
            assert signal.getsignal(signal.SIGTERM) != cli.interrupt
        assert signal.getsignal(signal.SIGTERM) == cli.interrupt
        with cli.StopSignal() as signals:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(500):  # Python runs the handler between two bytecodes: at once
                if signals.received is not None:
                    break
                time.sleep(0.01)
        assert signals.received == signal.SIGTERM and signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a program's own
        with cli.StopSignal() as signals:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(500):
                if signals.received is not None:
                    break
                time.sleep(0.01)
        assert signals.received == signal.SIGTERM and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc")
@pytest.mark.parametrize("name", ["download.py", "pretrain.py", "finetune.py", "predict.py", "export.py"])
def test_a_ctrl_c_while_a_script_starts_ends_it_without_a_traceback(tmp_path, name):
    """Importing torch takes a second or more: a Ctrl-C then (typing it at once, or between `invoke all`'s stages)
    was a traceback through torch's modules. Now the script is killed by it quietly, as later with its line."""
    process = subprocess.Popen([sys.executable, str(ROOT / name), "--help"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=tmp_path, preexec_fn=default_signals)
    maps = Path(f"/proc/{process.pid}/maps")
    with contextlib.suppress(OSError):  # gone: it started and ended (skipped below)
        while "libtorch" not in maps.read_text():  # torch's library is loaded: its modules are still to come
            time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    if process.returncode == 0:  # started and printed its help before the signal: nothing to see on this machine
        pytest.skip(f"{name} started before the signal")
    assert process.returncode == -signal.SIGINT and stderr == "", stderr


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_ctrl_c_stops_a_shell_loop_of_runs_not_only_the_run(tmp_path):
    """A terminal's Ctrl-C reaches the shell and the run: bash goes on with its loop after a child that exited 130,
    taking the signal as handled there, and stops after one killed by SIGINT. Before: the next run started."""
    data = make_class_folders(tmp_path / "data", train=40, size=8)
    run_once = shlex.join(script("pretrain.py", "--data-dir", data, "--out", "p.pt", "--epochs", "50", "--val-size",
                                 "6", *QUICK))
    process = subprocess.Popen(["bash", "-c", f"for i in 1 2; do {run_once}; echo next; done; echo after"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                               start_new_session=True, preexec_fn=default_signals)  # a terminal's foreground group
    for line in process.stderr:
        if line.startswith("  epoch 1/"):
            break
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == -signal.SIGINT, stderr  # bash too ended by it
    assert "stopped by SIGINT at epoch 1" in stderr and not {"next", "after"} & set(stdout.splitlines())
    assert load_checkpoint(tmp_path / "p.last.pt")["step"] > 0


@pytest.mark.slow
def test_a_second_ctrl_c_says_which_resume_state_is_saved(tmp_path):
    data = make_class_folders(tmp_path / "data", train=40, size=8)
    out = tmp_path / "p.pt"
    result = stop_with([signal.SIGINT, signal.SIGINT], ["--data-dir", data, "--out", out, "--epochs", "2",
                                                        "--val-size", "6", *QUICK], gap=0.25)
    assert result.returncode == stopped_status(signal.SIGINT), result.stderr
    line = error_line(result)  # the second signal came during the save, or after it (before: "nothing more saved")
    if line.endswith("no resume state was saved"):
        assert line == "pretrain.py: stopped at once by a second signal, SIGINT; no resume state was saved"
        assert not (tmp_path / "p.last.pt").exists()
    else:
        assert line.endswith(f"is saved: resume with: python {ROOT}/pretrain.py --resume {tmp_path}/p.last.pt") or \
            line.startswith("pretrain.py: stopped by SIGINT at "), line
        state = load_checkpoint(tmp_path / "p.last.pt")
        assert f"at epoch {state['epoch'] + 1}, step {state['step']}" in line, line


# ---------------------------------------------------------------- names that would split a line


@pytest.mark.slow
def test_a_tab_or_newline_in_a_file_name_is_escaped_in_predicts_lines(pretrained, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a\nb.png", "c\td.png"):
        Image.new("RGB", (32, 32), "red").save(folder / name)
    result = run("predict.py", folder, "--checkpoint", pretrained, "--device", "cpu")
    lines = result.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == [f"{folder}/a\\nb.png", f"{folder}/c\\td.png"]
    assert all(len(line.split("\t")) == 3 for line in lines)


def test_names_that_escape_alike_stay_apart_in_lines_and_json(pretrained, tmp_path):
    """A newline and a file named with a backslash and n; a Latin-1 byte and a file named with \\xe9. Before: each
    pair had the same "path" in --json, and the same line."""
    folder = tmp_path / "images"
    folder.mkdir()
    names = [b"new\nline.png", b"new\\nline.png", b"caf\xe9.png", b"caf\\xe9.png"]
    for name in names:
        with open(os.path.join(os.fsencode(folder), name), "wb") as f:
            Image.new("RGB", (32, 32), "red").save(f, format="PNG")
    lines = run("predict.py", folder, "--checkpoint", pretrained, "--device", "cpu").stdout.splitlines()
    assert sorted(line.split("\t")[0] for line in lines) == sorted(
        [f"{folder}/new\\nline.png", f"{folder}/new\\\\nline.png", f"{folder}/caf\\xe9.png",
         f"{folder}/caf\\\\xe9.png"])
    report = json.loads(run("predict.py", folder, "--checkpoint", pretrained, "--device", "cpu", "--json").stdout)
    assert sorted(os.fsencode(p["path"]) for p in report["predictions"]) == sorted(
        os.path.join(os.fsencode(folder), name) for name in names)  # the real names, byte for byte


def test_a_newline_in_a_class_name_is_escaped_in_the_report(capsys):
    logits, labels = torch.eye(2), torch.tensor([0, 1])
    predict.print_report("t", predict.classification_report(logits, labels, ["a\nb", "c"]), ["a\nb", "c"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 9 and lines[2] == "        a\\nb   100.00%    100.00%    100.00%"
    assert lines[7] == "  a\\nb    1     0"


# ---------------------------------------------------------------- flags that do not do what they seem to


@pytest.mark.parametrize("flags, warning", [
    (["--lr-schedule", "cosine", "--warmup-epochs", "3"], "the learning rate only warms up, there is no cosine phase"),
    (["--warmup-epochs", "6"], "the learning rate never reaches --lr 0.01 (it ends at 0.005)"),
    (["--lr-schedule", "cosine", "--warmup-epochs", "2"], None),
    (["--warmup-epochs", "3"], None),
])
def test_a_warmup_as_long_as_the_run_is_warned_about(capsys, flags, warning):
    pretrain.warn_about_warmup(pretrain.make_parser("", "pretrain").parse_args(["--epochs", "3", *flags]))
    err = capsys.readouterr().err
    if warning is None:
        assert err == ""
    else:
        assert err == (f"warning: --warmup-epochs {flags[-1]} with --epochs 3: {warning}; pass a --warmup-epochs "
                       "below --epochs\n")


@pytest.mark.slow
def test_finetune_takes_the_checkpoints_image_size_unless_given(pretrained, tiny_data, tmp_path):
    """pretrained was trained at 64 px; before, finetune.py trained it at the default 224 without a word."""
    flags = ["--checkpoint", pretrained, "--data-dir", tiny_data, "--epochs", "1", "--batch-size", "16",
             "--device", "cpu"]
    result = run("finetune.py", *flags, "--out", tmp_path / "f.pt")
    assert f"--image-size 64: the size {pretrained} was trained at" in result.stdout
    assert "trained at 64 px" in result.stdout and load_checkpoint(tmp_path / "f.pt")["image_size"] == 64
    result = run("finetune.py", *flags, "--out", tmp_path / "g.pt", "--image-size", "96")
    assert "the size" not in result.stdout and load_checkpoint(tmp_path / "g.pt")["image_size"] == 96


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGINT], ids=["nohup", "a script's background job"])
def test_a_signal_ignored_at_the_start_does_not_stop_the_run(tmp_path, sig):
    """nohup ignores SIGHUP so that the run outlives the terminal, a shell script starts its background jobs with
    SIGINT ignored so that they outlive its Ctrl-C: the stop on these signals must not undo that."""
    data = make_class_folders(tmp_path / "data", train=40, size=8)
    command = script("pretrain.py", "--data-dir", data, "--out", tmp_path / "p.pt", "--epochs", "1", "--val-size",
                     "6", *QUICK)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(sig, signal.SIG_IGN))
    for line in process.stderr:
        if line.startswith("  epoch 1/"):
            process.send_signal(sig)
            break
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    assert "test: accuracy" in stdout and (tmp_path / "p.test.json").exists()


def test_overwrite_with_resume_is_one_line(tmp_path):
    result = run("pretrain.py", "--resume", tmp_path / "p.last.pt", "--overwrite", check=False)
    assert error_line(result) == (f"pretrain.py: --overwrite with --resume {tmp_path}/p.last.pt: --overwrite starts a "
                                  "run afresh, --resume continues one; pass one of them")


def test_a_stdout_closed_from_the_start_is_lost_not_a_traceback(monkeypatch):
    """`predict.py DIR >&-`: Python's sys.stdout is then None."""
    monkeypatch.setattr(sys, "stdout", None)
    cli.guard_output(whole=True)
    print("a result")
    assert sys.stdout.lost.errno == errno.EBADF


def test_predicts_progress_goes_to_stderr_and_its_results_alone_to_stdout(pretrained, tiny_data):
    result = run("predict.py", tiny_data / "test", "--checkpoint", pretrained, "--device", "cpu", "--batch-size", "2")
    assert "  predict: 2/18 images" in result.stderr and "images  " not in result.stdout
    assert len([line for line in result.stdout.splitlines() if line.count("\t") == 2]) == 18


@pytest.mark.slow
def test_a_closed_terminal_stops_training_with_its_state_saved(tmp_path):
    """The terminal closes: its writes fail (EIO) and SIGHUP comes; the stop's own message cannot be shown."""
    data = make_class_folders(tmp_path / "data", train=40, size=8)
    out = tmp_path / "ck" / "p.pt"
    terminal, child = pty.openpty()
    # the reference's widths: an epoch long enough for a progress line on a terminal (at most two a second)
    process = subprocess.Popen(script("pretrain.py", "--data-dir", data, "--out", out, "--epochs", "2",
                                      "--val-size", "6", *QUICK_NO_HIDDEN), stdout=child, stderr=child,
                               preexec_fn=default_signals)
    os.close(child)
    shown = b""
    while b"  epoch 1/2: " not in shown:
        shown += os.read(terminal, 10_000)
    os.close(terminal)  # the terminal window closes...
    process.send_signal(signal.SIGHUP)  # ...and the kernel hangs its session up
    assert process.wait(timeout=600) == 128 + signal.SIGHUP
    state = load_checkpoint(out.parent / "p.last.pt")
    assert sorted(os.listdir(out.parent)) == ["p.last.pt"] and state["step"] > 0


@pytest.mark.slow
def test_download_into_a_closed_pipe_is_no_traceback(tiny_data):
    result = closed_pipe_run(script("download.py", "--root", tiny_data))  # nothing to do: its one line is lost
    assert result.returncode == 0 and result.stderr == "", result.stderr
