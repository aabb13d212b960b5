"""Bad input and faults: each ends in one clear line on stderr and a non-zero exit, or a clean recovery."""
import argparse
import http.server
import io
import json
import os
import pickle
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cli
import data
import download
import pretrain
from conftest import (QUICK, QUICK_NO_HIDDEN, ROOT, QuietHTTPServer, class_folder_archive, default_signals,
                      error_line, make_class_folders, md5, run, stopped_status, training_log)
from model import AlexNet, CheckpointError, load_checkpoint
from pretrain import save_checkpoint


# ---------------------------------------------------------------- images

def png_header_only(path, width, height):
    """A PNG that claims width x height: Pillow's decompression-bomb guard refuses it on open."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_bad_image_files_are_reported_and_the_rest_predicted(pretrained, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (40, 40), "red").save(folder / "good.png")
    (folder / "text.png").write_text("hello, I am not a picture")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[:400])
    png_header_only(folder / "bomb.png", 30000, 30000)
    result = run("predict.py", folder, "--checkpoint", pretrained, "--device", "cpu", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stdout.count("\n") == 1 and "good.png" in result.stdout
    errors = result.stderr.strip().splitlines()
    assert [e.split(": ")[1].rsplit("/", 1)[1] for e in errors] == ["bomb.png", "text.png", "truncated.jpg"]
    assert "decompression bomb" in errors[0] and all("cannot read this image" in e for e in errors)


def test_an_iphone_photo_given_by_name_is_said_to_need_converting(pretrained, tmp_path):
    """A .HEIC named on predict's command line (a folder's are left out with a warning, row 282): before, "remove or
    replace the file", as of a damaged one; Pillow reads none without a plugin."""
    (tmp_path / "IMG_0001.HEIC").write_bytes(b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(64))
    Image.new("RGB", (40, 40), "red").save(tmp_path / "good.png")
    result = run("predict.py", tmp_path / "IMG_0001.HEIC", tmp_path / "good.png", "--checkpoint", pretrained,
                 "--device", "cpu", check=False)
    assert result.returncode == 1 and "good.png" in result.stdout
    assert error_line(result) == (f"predict.py: {tmp_path}/IMG_0001.HEIC: cannot read this image (cannot identify "
                                  f"image file '{tmp_path}/IMG_0001.HEIC'); convert it to .jpg or .png (Pillow reads "
                                  "HEIC and AVIF only with a plugin)")


def test_a_path_that_is_no_file_or_folder_is_named_as_such(pretrained, tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(tmp_path / "socket.png"))
        result = run("predict.py", "/dev/zero", tmp_path / "pipe.png", tmp_path / "socket.png", "--checkpoint",
                     pretrained, "--device", "cpu", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    kinds = {"/dev/zero": "a character device", tmp_path / "pipe.png": "a FIFO", tmp_path / "socket.png": "a socket"}
    assert result.stderr.splitlines()[:3] == [f"predict.py: {path}: {kind}, not an image file or a folder; pass image "
                                              "files or folders" for path, kind in kinds.items()]


@pytest.mark.slow
def test_a_huge_image_is_predicted(pretrained, tmp_path):
    Image.new("RGB", (8000, 8000), "blue").save(tmp_path / "huge.png")
    result = run("predict.py", tmp_path / "huge.png", "--checkpoint", pretrained, "--device", "cpu")
    assert result.stdout.startswith(str(tmp_path / "huge.png"))


def test_exif_rotation_is_applied(tmp_path):
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:, :32] = 255  # left half white, landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display turns it 90 degrees clockwise
    Image.fromarray(pixels).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    decoded, _ = data.decode(tmp_path / "rotated.jpg", 32)
    # upright it is portrait with the white half on top; the centre crop keeps the middle, white above black
    assert decoded[:8].mean() > 200 and decoded[-8:].mean() < 50


# ---------------------------------------------------------------- data sets

def test_train_and_test_with_different_classes(tmp_path):
    root = make_class_folders(tmp_path / "d", train=2, test=1)
    (root / "test" / "red").rename(root / "test" / "crimson")
    result = run("pretrain.py", "--data-dir", root, "--out", tmp_path / "p.pt", *QUICK, check=False)
    expected = ("train/ and test/ have different class folders (only in train: red; only in test: crimson); each "
                "class needs images in both: rename a folder spelled otherwise, or move some of a class's images into "
                "the other split's folder of its name")  # before: "make them the same" (an empty folder: remove it)
    assert expected in error_line(result)


def test_a_class_spelled_in_nfc_and_nfd_is_reported_so_that_the_names_differ(tmp_path):
    """Before: "only in train: ['café'], only in test: ['café']", two names printed alike."""
    root = make_class_folders(tmp_path / "d", classes=("caf\u00e9", "tea"), train=2, test=1)
    (root / "test" / "caf\u00e9").rename(root / "test" / "cafe\u0301")  # as macOS spells it
    result = run("pretrain.py", "--data-dir", root, "--out", tmp_path / "p.pt", *QUICK, check=False)
    assert ("train/ and test/ have different class folders (only in train: caf\u00e9; only in test: cafe\u0301 "
            "(not NFC: 'cafe\\u0301')); each class needs images in both") in error_line(result)


def test_missing_test_folder(tmp_path):
    root = make_class_folders(tmp_path / "d", train=2, test=1)
    (root / "test").rename(root / "elsewhere")
    result = run("pretrain.py", "--data-dir", root, "--out", tmp_path / "p.pt", *QUICK, check=False)
    assert "no test/ folder" in error_line(result)


def test_corrupt_training_image_names_the_file(tmp_path):
    root = make_class_folders(tmp_path / "d", train=2, test=1)
    (root / "train" / "red" / "0001.png").write_bytes(b"broken")
    line = error_line(run("pretrain.py", "--data-dir", root, "--out", tmp_path / "p.pt", *QUICK, check=False))
    assert "red/0001.png: cannot read this image" in line and "remove or replace the file" in line


def test_a_single_class_is_refused(tmp_path):
    root = make_class_folders(tmp_path / "d", classes=("red",), train=2, test=1)
    line = error_line(run("pretrain.py", "--data-dir", root, "--out", tmp_path / "p.pt", *QUICK, check=False))
    assert f"{root}/train: only one class folder (red); a classifier needs at least two" in line


def non_utf8_file(folder: Path, name: bytes, content: bytes) -> Path:
    """A file whose name is not UTF-8 (as a Latin-1 system writes it), made through a bytes path."""
    path = os.path.join(os.fsencode(folder), name)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    os.write(descriptor, content)
    os.close(descriptor)
    return Path(os.fsdecode(path))


def test_a_file_name_that_is_not_utf8_loads_and_is_named_when_damaged(tmp_path):
    root = make_class_folders(tmp_path / "d", train=2, test=1)
    odd = non_utf8_file(root / "train" / "red", b"caf\xe9.png", (root / "train" / "red" / "0000.png").read_bytes())
    assert len(data.load_folder(root / "train").labels) == 7
    odd.write_bytes(b"damaged")
    line = error_line(run("pretrain.py", "--data-dir", root, "--out", tmp_path / "p.pt", *QUICK, check=False))
    assert "red/caf\\xe9.png: cannot read this image" in line


@pytest.mark.slow  # a process: its stdout encodes strictly, as a terminal's does
def test_predict_prints_file_names_that_are_not_utf8(pretrained, tiny_data, tmp_path):
    non_utf8_file(tmp_path, b"caf\xe9.png", next((tiny_data / "test" / "red").iterdir()).read_bytes())
    non_utf8_file(tmp_path, b"damaged\xff.png", b"damaged")
    strict = {**os.environ, "PYTHONIOENCODING": "utf-8"}  # strict stdout, as most UTF-8 locales have
    result = run("predict.py", tmp_path, "--checkpoint", pretrained, "--device", "cpu", check=False, env=strict)
    assert result.stdout.startswith(f"{tmp_path}/caf\\xe9.png\t")
    assert "damaged\\xff.png: cannot read this image" in error_line(result)


# ---------------------------------------------------------------- checkpoints

def test_finetune_from_a_file_that_is_not_our_checkpoint(tmp_path, tiny_data):
    torch.save(AlexNet(hidden=(8, 4)).state_dict(), tmp_path / "plain.pt")
    result = run("finetune.py", "--data-dir", tiny_data, "--checkpoint", tmp_path / "plain.pt",
                 "--out", tmp_path / "f.pt", *QUICK_NO_HIDDEN, check=False)
    assert "plain.pt: not a checkpoint of this project" in error_line(result)


def test_predict_with_a_checkpoint_of_another_shape(pretrained, tmp_path, tiny_data):
    checkpoint = load_checkpoint(pretrained)
    checkpoint["model_args"]["num_classes"] = 5
    checkpoint["classes"] = [f"class{i}" for i in range(5)]  # names and model agree; the weights do not
    save_checkpoint(checkpoint, tmp_path / "mismatch.pt")
    line = error_line(run("predict.py", tiny_data / "test", "--checkpoint", tmp_path / "mismatch.pt", check=False))
    assert "mismatch.pt: weights do not fit AlexNet" in line and "classifier.6.weight" in line


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    path = tmp_path / "c.pt"
    writer = subprocess.Popen([sys.executable, "-c", f"""
import sys, torch
sys.path.insert(0, {str(ROOT)!r})
from pretrain import save_checkpoint
big = torch.randn(50_000_000)
for i in range(1000):
    save_checkpoint({{"step": i, "weights": big}}, {str(path)!r})
    print(i, flush=True)
"""], stdout=subprocess.PIPE, text=True)
    for line in writer.stdout:  # kill it while it writes the third file
        if line.strip() == "1":
            break
    writer.kill()
    writer.wait()
    assert torch.load(path, weights_only=True)["step"] >= 1
    save_checkpoint({"step": "next"}, path)  # and the next save clears what the killed write left
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


class Killed(BaseException):
    """A process's death as a test can cause it in-process: nothing after it runs (no handler takes it)."""


@pytest.mark.slow
def test_finetune_killed_after_its_starting_weights_are_saved_resumes_bit_identically(pretrained, tiny_data,
                                                                                       tmp_path, monkeypatch):
    """finetune.py validates a checkpoint's own head as epoch 0 and saves it as --out at once; killed (SIGKILL, the
    machine's power) before epoch 1 ended, it left --out without a resume state: no --resume, and a fresh run (or
    `invoke all --resume`) refused for the --out it left. Now the resume state comes with it and the resumed run is
    the unstopped one's, bit for bit."""
    flags = ["--checkpoint", pretrained, "--data-dir", tiny_data, "--epochs", "2", "--val-size", "6",
             *QUICK_NO_HIDDEN, "--mode", "full"]
    whole, killed = tmp_path / "whole" / "ft.pt", tmp_path / "killed" / "ft.pt"
    run("finetune.py", *flags, "--out", whole)

    def die_at_epoch_1(run_, progress, signals, writer, started):
        writer.wait()  # --out on disk, as a kill any time in epoch 1 finds it
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(pretrain, "train_one_epoch", die_at_epoch_1)
        with pytest.raises(Killed):
            run("finetune.py", *flags, "--out", killed)
    assert killed.exists() and killed.with_suffix(".last.pt").exists(), sorted(os.listdir(killed.parent))
    resumed = run("finetune.py", "--resume", killed.with_suffix(".last.pt"))
    assert "at the end of epoch 0" in resumed.stdout
    for name in ("ft.pt", "ft.last.pt"):
        a, b = (torch.load(folder / name, weights_only=True) for folder in (whole.parent, killed.parent))
        assert a["epoch"] == b["epoch"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), name
    logs = [[{k: v for k, v in row.items() if k not in ("images_per_s", "epoch_s")} for row in training_log(path)]
            for path in (whole, killed)]
    assert logs[0] == logs[1] and [row["epoch"] for row in logs[0]] == ["0", "1", "2"]  # epoch 0 kept on resume
    reports = [json.loads(path.with_suffix(".test.json").read_text()) for path in (whole, killed)]
    assert reports[0]["accuracy"] == reports[1]["accuracy"] and reports[0]["loss"] == reports[1]["loss"]



@pytest.mark.slow
def test_a_runs_first_log_is_written_after_its_first_resume_state(tiny_data, tmp_path, monkeypatch):
    """The first epoch's .csv and .png came while its resume state was still being written (on the writer's thread):
    a run killed then (SIGKILL, at the end of its first epoch) left a log and no resume state: no --resume, and a
    fresh run refused for the log it left. A slow disk (a write delayed) makes that moment last."""
    out = tmp_path / "ck" / "p.pt"
    last, seen = out.with_suffix(".last.pt"), []
    save, write_csv = pretrain.save_checkpoint, pretrain.write_csv

    def slow_save(checkpoint, path):
        time.sleep(0.3)
        save(checkpoint, path)

    def logged(path, history):
        seen.append(last.exists())
        write_csv(path, history)

    monkeypatch.setattr(pretrain, "save_checkpoint", slow_save)
    monkeypatch.setattr(pretrain, "write_csv", logged)
    run("pretrain.py", "--data-dir", tiny_data, "--out", out, "--epochs", "2", "--val-size", "6", *QUICK)
    assert seen == [True, True]


@pytest.mark.slow
def test_an_overwrite_run_leaves_no_resume_state_of_the_run_it_replaces(pretrained, tmp_path, monkeypatch, tiny_data):
    """Killed (or on a full disk) after its first best checkpoint and before its first resume state, an --overwrite
    run left the replaced run's .last.pt beside its own --out: a rerun advised resuming it, which tested the new
    weights as the old run's best epoch."""
    out = tmp_path / "p.pt"
    shutil.copy(pretrained, out)  # a finished run there
    shutil.copy(pretrained.with_suffix(".last.pt"), out.with_suffix(".last.pt"))

    def die_at_epoch_1(run_, progress, signals, writer, started):
        raise Killed
    monkeypatch.setattr(pretrain, "train_one_epoch", die_at_epoch_1)
    with pytest.raises(Killed):
        run("pretrain.py", "--data-dir", tiny_data, "--out", out, "--epochs", "1", "--val-size", "6", *QUICK,
            "--overwrite")
    assert not out.with_suffix(".last.pt").exists()


@pytest.mark.slow
def test_a_run_killed_before_its_last_epochs_log_has_it_once_resumed(tiny_data, tmp_path, monkeypatch):
    """Killed (SIGKILL, a full disk) after the last epoch's resume state and before its log, a resumed run went
    straight to its test: it said it saved the .csv and .png, which lacked the last epoch (and its kept mark)."""
    out = tmp_path / "p.pt"
    write_csv = pretrain.write_csv

    def die_before_the_last_log(path, history):
        if len(history) == 2:
            raise Killed
        write_csv(path, history)
    with monkeypatch.context() as patch:
        patch.setattr(pretrain, "write_csv", die_before_the_last_log)
        with pytest.raises(Killed):
            run("pretrain.py", "--data-dir", tiny_data, "--out", out, "--epochs", "2", "--val-size", "6", *QUICK)
    assert "test: accuracy" in run("pretrain.py", "--resume", out.with_suffix(".last.pt")).stdout
    assert [row["epoch"] for row in training_log(out)] == ["1", "2"]
    # the curves too: every epoch, the kept one marked (a catch-up of the .csv alone left epoch 1's picture)
    state = torch.load(out.with_suffix(".last.pt"), weights_only=True)
    drawn = pretrain.learning_curves(state["history"], state["best"]["epoch"], "pretrain: p, 2 of 2 epochs")
    assert np.array_equal(np.asarray(Image.open(out.with_suffix(".png")).convert("RGB")), np.asarray(drawn))


@pytest.mark.slow
def test_a_new_best_takes_away_the_test_report_of_the_weights_it_replaces(pretrained, tmp_path, monkeypatch, tiny_data):
    """An --overwrite run (or a tested run resumed with a larger --epochs) stopped after its first new best left the
    replaced weights' .test.json and .confusion.png beside the new --out: another run's accuracy, epoch and matrix."""
    out = tmp_path / "p.pt"
    for suffix in (".pt", ".last.pt", ".csv", ".png", ".test.json", ".confusion.png"):  # a finished, tested run
        shutil.copy(pretrained.with_suffix(suffix), out.with_suffix(suffix))
    train_one_epoch = pretrain.train_one_epoch

    def stop_in_epoch_2(run_, progress, signals, writer, started):
        if progress.epoch == 1:
            writer.wait()  # epoch 1's best on disk, as a stop any time in epoch 2 finds it
            raise Killed
        return train_one_epoch(run_, progress, signals, writer, started)
    monkeypatch.setattr(pretrain, "train_one_epoch", stop_in_epoch_2)
    with pytest.raises(Killed):
        run("pretrain.py", "--data-dir", tiny_data, "--out", out, "--epochs", "2", "--val-size", "6", *QUICK,
            "--overwrite", "--seed", "1")
    assert load_checkpoint(out)["epoch"] == 1 and "test_metrics" not in load_checkpoint(out)
    assert not out.with_suffix(".test.json").exists() and not out.with_suffix(".confusion.png").exists()


# ---------------------------------------------------------------- archives and download

class Flaky(http.server.BaseHTTPRequestHandler):
    """Serves an archive, cutting every transfer off half-way while `drop` is set; while `hold` (an Event) is
    not set either, the cut transfer stays open until it is: a download under way, for as long as a test needs."""
    payload = b""
    drop = True
    hold: threading.Event | None = None

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload[: len(self.payload) // 2] if self.drop else self.payload)
        self.wfile.flush()
        if self.drop and self.hold is not None:
            self.hold.wait(timeout=600)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky_server(tmp_path, tiny_data):
    """(handler class, URL) of a Flaky server of the tiny class folders as a .tar.gz; stopped afterwards."""
    archive = tmp_path / "data.tar.gz"
    class_folder_archive(archive, tiny_data)
    handler = type("Handler", (Flaky,), {"payload": archive.read_bytes()})
    server = QuietHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield handler, f"http://127.0.0.1:{server.server_address[1]}/data.tar.gz"
    if handler.hold is not None:
        handler.hold.set()
    server.shutdown()


@pytest.mark.parametrize("with_md5", [True, False])
def test_a_dropped_download_leaves_nothing_and_a_rerun_succeeds(tmp_path, tiny_data, flaky_server, with_md5):
    handler, url = flaky_server
    root = tmp_path / "out" / "cifar10"
    flags = ["--md5", md5(tmp_path / "data.tar.gz")] if with_md5 else []
    line = error_line(run("download.py", "--root", root, "--source", url, *flags, check=False))
    assert ("checksum mismatch" if with_md5 else "damaged or incomplete archive") in line
    assert not root.parent.exists() or list(root.parent.iterdir()) == []
    handler.drop = False
    run("download.py", "--root", root, "--source", url, *flags)
    assert len(list(root.rglob("*.png"))) == len(list(tiny_data.rglob("*.png")))


# ---------------------------------------------------------------- training faults

@pytest.mark.slow
def test_nan_loss_names_epoch_step_and_flag(tiny_data, tmp_path):
    result = run("pretrain.py", "--data-dir", tiny_data, "--out", tmp_path / "p.pt", "--val-size", "6", *QUICK,
                 "--lr", "1e6", check=False)
    line = error_line(result)
    assert "the training loss became nan at epoch 1, step" in line and "lower --lr (now 1000000.0)" in line
    assert not (tmp_path / "p.pt").exists()


@pytest.mark.slow
def test_a_non_finite_validation_loss_stops_the_run_naming_the_epoch_never_best(tiny_data, tmp_path):
    """A set smaller than one batch at --lr 1e37: the one step's loss is finite, the weights after it are not.
    Before: `val_loss nan ... *best`, a test report with loss nan, exit 0, and NaN in .test.json."""
    result = run("pretrain.py", "--data-dir", tiny_data, "--out", tmp_path / "p.pt", "--val-size", "6", *QUICK,
                 "--batch-size", "512", "--epochs", "2", "--lr", "1e37", check=False)
    assert error_line(result) == ("pretrain.py: the validation loss became nan at epoch 1: the weights diverged; "
                                  "start again with a lower --lr (now 1e+37) and --overwrite")
    assert "*best" not in result.stdout and os.listdir(tmp_path) == []


@pytest.mark.slow
def test_a_finite_but_huge_validation_loss_stops_the_run_as_diverged(tiny_data, tmp_path):
    """--lr 1e6, one step: a finite validation loss of 1e30 or so was kept as best. Over 100 x ln(classes), a
    uniform guess's loss, the run stops as a non-finite loss does; the suite's normal runs never come near it."""
    result = run("pretrain.py", "--data-dir", tiny_data, "--out", tmp_path / "p.pt", "--val-size", "6", *QUICK,
                 "--batch-size", "512", "--epochs", "2", "--lr", "1e6", check=False)
    line = error_line(result)
    assert re.fullmatch(r"pretrain\.py: the validation loss became [0-9.]+e\+\d+ at epoch 1: the weights diverged; "
                        r"start again with a lower --lr \(now 1000000\.0\) and --overwrite", line), line
    assert "*best" not in result.stdout and os.listdir(tmp_path) == []


def test_weight_decay_that_diverges_is_named_with_the_lr():
    args = argparse.Namespace(lr=0.01, weight_decay=1e6)
    with pytest.raises(cli.UsageError, match=r"a lower --lr \(now 0.01\) or --weight-decay \(now 1000000.0\)"):
        pretrain.diverged("the training loss became nan at epoch 1, step 1", args)


def test_reports_are_valid_json_whatever_the_numbers():
    """json.dumps writes NaN and Infinity, tokens no JSON reader takes (a .test.json with `"loss": NaN`)."""
    text = cli.json_text({"loss": float("nan"), "rows": [float("inf"), 0.5, (1, -float("inf"))], "name": "x"})
    assert json.loads(text) == {"loss": None, "rows": [None, 0.5, [1, None]], "name": "x"}


def test_init_weights_holding_nan_are_refused(tmp_path):
    weights = AlexNet(num_classes=3, hidden=(8, 4)).state_dict()
    weights["classifier.1.weight"][0, 0] = float("nan")
    torch.save(weights, tmp_path / "w.pth")
    with pytest.raises(cli.UsageError, match=r"--init .*w\.pth: its weights hold NaN or infinite values "
                                             r"\(classifier\.1\.weight\)"):
        pretrain.initial_weights(str(tmp_path / "w.pth"))


def test_compile_without_a_working_cxx_compiler_trains_eager_with_a_warning(tiny_data, tmp_path):
    """Before: a 100-line `InductorError: InvalidCxxCompiler` at the first step."""
    from torch._inductor import config
    # what CXX=... sets; config.patch, as monkeypatch's undo deleted the setting on torch 2.8 (where cpp is a class)
    with config.patch({"cpp.cxx": (str(tmp_path / "no-such-g++"),)}):
        result = run("pretrain.py", "--data-dir", tiny_data, "--out", tmp_path / "p.pt", "--val-size", "6", *QUICK,
                     "--epochs", "1", "--compile")
    assert ("warning: --compile: no working C++ compiler for torch.compile (install g++, or name one in CXX); "
            "training without it") in result.stderr.splitlines()
    assert re.search(r"\(--precision auto\), [0-9,]+ trainable parameters", result.stdout)  # not ", compiled"


def test_compile_on_cuda_without_pythons_headers_trains_eager_with_a_warning(tmp_path, monkeypatch, capsys):
    """Before: on CUDA, where python3-dev is not installed, Triton's launcher failed to build at the first step
    (`fatal error: Python.h: No such file or directory`, then a long traceback). The CPU's inductor needs none."""
    import sysconfig
    real = sysconfig.get_paths
    monkeypatch.setattr(sysconfig, "get_paths", lambda *args, **kwargs: real(*args, **kwargs) | {"include": tmp_path})
    net = torch.nn.Linear(2, 2)
    assert cli.compiled(net, torch.device("cuda")) is net
    assert capsys.readouterr().err == (f"warning: --compile: no {tmp_path / 'Python.h'}, which Triton needs on CUDA "
                                       "(install python3-dev); training without it\n")
    cli.compiled(net, torch.device("cpu"))  # compiled, or eager where there is no g++: for that reason alone
    assert "Python.h" not in capsys.readouterr().err


def test_world_size_outside_torchrun_is_one_line(tiny_data, tmp_path, monkeypatch):
    """`WORLD_SIZE=1 python pretrain.py`: before, torch's `ValueError: ... RANK expected` traceback."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    for name in cli.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    result = run("pretrain.py", "--data-dir", tiny_data, "--out", tmp_path / "p.pt", *QUICK, check=False)
    assert error_line(result) == ("pretrain.py: WORLD_SIZE is set but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not, "
                                  "as outside torchrun: start with torchrun, or unset WORLD_SIZE")


def test_too_few_images_without_limit_does_not_blame_limit(tmp_path):
    data_dir = make_class_folders(tmp_path / "d", train=1, test=1)
    result = run("pretrain.py", "--data-dir", data_dir, "--out", tmp_path / "p.pt", *QUICK, check=False)
    assert error_line(result) == (f"pretrain.py: {data_dir}/train: 3 images are too few to keep a validation "
                                  "image per class (3) and train on the rest; use more images")
    shutil.copy(data_dir / "train" / "red" / "0000.png", data_dir / "train" / "red" / "0001.png")  # 2, 1 and 1
    result = run("pretrain.py", "--data-dir", data_dir, "--out", tmp_path / "p.pt", *QUICK, check=False)
    assert error_line(result) == ("pretrain.py: the default validation split of 3: leaves a class with no training "
                                  "image; give every class two images or more")  # before: "--val-size 3", not given


def test_out_of_memory_suggests_a_smaller_batch(tiny_data, tmp_path, monkeypatch, capsys):
    def out_of_memory(self, x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(AlexNet, "forward", out_of_memory)
    with pytest.raises(SystemExit) as stop:
        pretrain.main(["--data-dir", str(tiny_data), "--out", str(tmp_path / "p.pt"), "--val-size", "6", *QUICK])
    assert stop.value.code == "pretrain.py: out of GPU memory with --batch-size 16; pass a smaller --batch-size, e.g. 8"


def test_unwritable_output_folder_fails_before_training(tiny_data, tmp_path):
    (tmp_path / "a_file").write_text("a file where --out needs a folder: unwritable even for root")
    result = run("pretrain.py", "--data-dir", tiny_data, "--out", tmp_path / "a_file" / "p.pt", "--epochs", "1", *QUICK,
                 check=False)
    line = error_line(result)
    assert "a_file/p.pt: " in line and "a_file is a file, not a folder" in line and "epoch" not in result.stdout


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint({"version": 1}, path)

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    message = "cannot write the checkpoint \\(No space left on device\\); the previous one is untouched"
    with pytest.raises(CheckpointError, match=message):
        save_checkpoint({"version": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"version": 1} and [p.name for p in tmp_path.iterdir()] == ["c.pt"]


class Payload:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('ran')",))


def test_a_doctored_official_tarball_cannot_run_code(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("batches.meta", "data_batch_1"):
            payload = pickle.dumps({"label_names": ["a"], "data": Payload(), "labels": [0]}, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    result = run("download.py", "--root", tmp_path / "c", "--source", archive, check=False, cwd=tmp_path)
    expected = "cifar-10-batches-py/batches.meta is missing or damaged (refusing to load __builtin__.exec)"
    assert expected in error_line(result)
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "c").exists()


def download_under_way(work: Path, flaky_server) -> subprocess.Popen:
    """`download.py --root WORK/c` from a server that holds the transfer half-way, returned with its
    temporary folder there: whatever the machine's load, the download is under way until the test acts."""
    handler, url = flaky_server
    handler.hold = threading.Event()
    work.mkdir()
    command = [sys.executable, str(ROOT / "download.py"), "--root", str(work / "c"), "--source", url]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=work, preexec_fn=default_signals)
    while not any(p.name.startswith(".c.partial-") for p in work.iterdir()):
        assert process.poll() is None, process.communicate()[1]
        time.sleep(0.01)
    return process


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_an_interrupted_download_leaves_nothing(tmp_path, flaky_server, sig):
    process = download_under_way(tmp_path / "work", flaky_server)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == stopped_status(sig), stderr  # stopped by a signal: not a failure's 1
    assert stderr.strip().splitlines()[-1] == f"download.py: interrupted; nothing was written to {tmp_path / 'work/c'}"
    assert "Traceback" not in stderr and list((tmp_path / "work").iterdir()) == []


@pytest.mark.slow
def test_the_next_download_clears_what_a_killed_one_left(tmp_path, flaky_server, tiny_data):
    work = tmp_path / "work"
    process = download_under_way(work, flaky_server)
    process.kill()
    process.communicate(timeout=120)
    assert any(p.name.startswith(".c.partial-") for p in work.iterdir())  # killed half-way: nothing cleaned up
    handler, url = flaky_server
    handler.drop = False
    run("download.py", "--root", work / "c", "--source", url)
    assert [p.name for p in work.iterdir()] == ["c"]
    assert len(list((work / "c").rglob("*.png"))) == len(list(tiny_data.rglob("*.png")))


def test_a_second_download_into_the_same_root_waits_for_the_first(tmp_path, tiny_data):
    root = tmp_path / "c"
    with download.download_lock(root):  # a real lock, as a running download holds it
        result = run("download.py", "--root", root, "--source", tiny_data, check=False)
    assert f"--root {root}: another download (pid {os.getpid()}) is writing it" in error_line(result)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("inside", [False, True])
def test_a_root_that_is_a_file_is_one_line(tmp_path, tiny_data, inside):
    (tmp_path / "f").write_text("a file")
    root = tmp_path / "f" / "c" if inside else tmp_path / "f"
    line = error_line(run("download.py", "--root", root, "--source", tiny_data, check=False))
    assert f"--root {root}: {tmp_path / 'f' if inside else 'it'} is a file, not a folder; choose another --root" in line


def test_a_root_that_is_a_link_or_too_long_a_name_is_one_line(tmp_path, tiny_data):
    """Before: a traceback after unpacking (a link to an empty folder, or to nothing: NotADirectoryError from the
    rename), or before it (a name over 255 bytes: OSError from stat); a link to a data set is still read."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "to-empty").symlink_to(tmp_path / "empty")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for name, target in (("to-empty", tmp_path / "empty"), ("dangling", tmp_path / "nowhere")):
        line = error_line(run("download.py", "--root", tmp_path / name, "--source", tiny_data, check=False))
        assert line == (f"download.py: --root {tmp_path / name}: is a link (to {target}), which the data set would "
                        "replace; pass the folder it points to, or another --root")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "empty", "to-empty"]  # no lock, no partial
    long = tmp_path / ("x" * 300) / "c"
    assert error_line(run("download.py", "--root", long, "--source", tiny_data, check=False)) == (
        f"download.py: --root {long}: cannot reach it (File name too long); choose another --root")
    (tmp_path / "to-data").symlink_to(tiny_data)
    assert run("download.py", "--root", tmp_path / "to-data", "--source", tiny_data).returncode == 0


@pytest.mark.parametrize("damage", ["no test/", "an empty class folder"])
def test_an_incomplete_root_is_not_taken_for_a_finished_one(tmp_path, tiny_data, damage):
    """A download's root (its .source record in it) is to be removed and made again; one without the record holds a
    user's own images, which no advice removes (before: "remove it and run again" for a user's photos without test/)."""
    def damaged(root: Path) -> str:
        for image in (root / "test" / "red").iterdir():
            image.unlink()
        if damage == "no test/":
            (root / "test").rename(root.parent / "elsewhere")
        return error_line(run("download.py", "--root", root, "--source", tiny_data, check=False))

    problem = ": no test/ folder" if damage == "no test/" else "/test/red: class folder has no images"
    root = make_class_folders(tmp_path / "c", train=1, test=1)
    line = damaged(root)
    advice = (f"pass --source {root / 'train'} and a new --root to split its class folders into train/ and test/ there"
              if damage == "no test/" else "for images of your own, lay them out as train/<class>/ and test/<class>/ "
              "(some of each class's images in test/)")
    assert f"--root {root}: an incomplete data set (c{problem}" in line and line.endswith(
        f"), with no record of a download in it (.source); {advice}; else choose another --root")
    run("download.py", "--root", tmp_path / "made" / "c", "--source", tiny_data)
    line = damaged(tmp_path / "made" / "c")
    assert f"--root {tmp_path / 'made' / 'c'}: an incomplete data set (c{problem}" in line and line.endswith(
        "); remove it and run again, or choose another --root")


def test_md5_in_either_case_is_checked(tmp_path, tiny_data):
    archive = tmp_path / "a.tar.gz"
    class_folder_archive(archive, tiny_data)
    run("download.py", "--root", tmp_path / "c", "--source", archive, "--md5", md5(archive).upper())


def test_the_md5_is_checked_where_fips_mode_refuses_md5_for_security(tmp_path, tiny_data, monkeypatch):
    """Under FIPS (RHEL's, for one) OpenSSL refuses md5 unless told it is no security use; a checksum is none."""
    import hashlib
    plain_md5 = hashlib.md5

    def fips_md5(*args, usedforsecurity=True):
        if usedforsecurity:
            raise ValueError("[digital envelope routines] unsupported")
        return plain_md5(*args, usedforsecurity=False)

    archive = tmp_path / "a.tar.gz"
    class_folder_archive(archive, tiny_data)
    right = md5(archive)
    monkeypatch.setattr(hashlib, "md5", fips_md5)
    run("download.py", "--root", tmp_path / "c", "--source", archive, "--md5", right)


@pytest.mark.slow  # a process, which the timeout ends if the read never does
@pytest.mark.parametrize("kind", ["a character device", "a FIFO"])
def test_an_md5_against_a_source_that_is_no_regular_file_is_a_mismatch_not_an_endless_read(tmp_path, kind):
    """/dev/zero never ends, a FIFO without a writer blocks its open: neither is read for a checksum."""
    source = Path("/dev/zero")
    if kind == "a FIFO":
        os.mkfifo(source := tmp_path / "pipe.tar")
    result = run("download.py", "--root", tmp_path / "c", "--source", source, "--md5", "0" * 32, check=False,
                 timeout=60)
    assert result.returncode == 1 and "checksum mismatch" in error_line(result)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("value, message", [
    ("c58f30108f718f92721af3b95e74349", "--md5: must be 32 hexadecimal digits (an md5 checksum)"),
    ("z" * 32, "--md5: must be 32 hexadecimal digits (an md5 checksum)"),
    ("0" * 32, "is a folder, which has no checksum; drop --md5"),
])
def test_an_md5_that_cannot_be_checked_is_refused(tmp_path, tiny_data, value, message):
    result = run("download.py", "--root", tmp_path / "c", "--source", tiny_data, "--md5", value, check=False)
    assert result.returncode == (1 if "folder" in message else 2) and message in error_line(result)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target", ["..", "loop"])
def test_a_link_loop_in_a_source_folder_is_one_short_line(tmp_path, target):
    source = make_class_folders(tmp_path / "source", train=2, test=1)
    loop = source / "train" / "red" / "loop"
    loop.symlink_to(target)  # back to train/, or to itself
    result = run("download.py", "--root", tmp_path / "c", "--source", source, check=False)
    problem = (f"is a link back to {source}/train, a loop; remove it" if target == ".." else
               "is a link that cannot be followed (Too many levels of symbolic links)")
    assert f"--source {source}: {loop} {problem}" in error_line(result) and result.stderr.count("\n") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["source"]


@pytest.mark.parametrize("kind", ["a FIFO", "a character device"])
def test_a_device_or_fifo_in_a_tar_is_refused_by_name(tmp_path, tiny_data, kind):
    special = Path("/dev/null")  # a real device node, and no mknod needed
    if kind == "a FIFO":
        special = tmp_path / "pipe"
        os.mkfifo(special)
    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tiny_data, "cifar10")
        tar.add(special, "cifar10/train/red/odd.png")
    line = error_line(run("download.py", "--root", tmp_path / "c", "--source", archive, check=False))
    assert f"{archive}: member 'cifar10/train/red/odd.png' is {kind}, not a regular file or folder; refusing" in line
    assert not (tmp_path / "c").exists()


def zip_bomb(path: Path, size: int) -> Path:
    """A zip of one file of `size` zero bytes: a thousandth of that to download."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive, archive.open("train/a/0.png", "w") as member:
        for _ in range(size // 2**20):
            member.write(bytes(2**20))
    return path


def test_an_archive_declaring_more_than_the_limit_is_refused(tmp_path, monkeypatch):
    bomb = zip_bomb(tmp_path / "bomb.zip", 64 * 2**20)
    monkeypatch.setattr(download, "MAX_UNPACKED_BYTES", 32 * 2**20)  # 16 GiB would take minutes to compress
    with pytest.raises(cli.DataError, match="bomb.zip: would unpack to 64.0 MiB, more than the 32.0 MiB this script"):
        download.download(tmp_path / "c", str(bomb))
    assert [p.name for p in tmp_path.iterdir()] == ["bomb.zip"]


def test_an_archive_larger_than_the_free_space_is_refused(tmp_path, small_filesystem):
    bomb = zip_bomb(tmp_path / "bomb.zip", 64 * 2**20)
    disk = small_filesystem("16m")
    line = error_line(run("download.py", "--root", disk / "c", "--source", bomb, check=False))
    assert f"{bomb}: would unpack to 64.0 MiB, more than the " in line and f" MiB free at {disk}; free space" in line
    assert os.listdir(disk) == []


def test_a_decompression_bomb_warning_names_the_file(pretrained, tmp_path, monkeypatch):
    """Before: Pillow's raw DecompressionBombWarning, naming no file."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 40 x 40 image is above it, and below twice it
    Image.new("RGB", (40, 40), "red").save(tmp_path / "big.png")
    result = run("predict.py", tmp_path / "big.png", "--checkpoint", pretrained, "--device", "cpu")
    assert (f"warning: {tmp_path}/big.png: Image size (1600 pixels) exceeds limit of 1000 pixels, could be "
            "decompression bomb DOS attack.") in result.stderr.splitlines()
    assert "DecompressionBombWarning" not in result.stderr
