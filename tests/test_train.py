import functools
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import data
import predict
from conftest import QUICK, QUICK_NO_HIDDEN, ROOT, error_line, make_class_folders, run, start, stop_during, training_log
from model import AlexNet
import cli
from cli import ProgressLine
from pretrain import print_epoch, write_csv


def test_pretrain_writes_checkpoints_log_and_one_test_report(pretrained):
    checkpoint = torch.load(pretrained, weights_only=True)
    assert checkpoint["model_args"] == {"num_classes": 3, "dropout": 0.5, "hidden": (64, 32)}  # QUICK's --hidden
    assert checkpoint["classes"] == ["blue", "green", "red"]
    assert (checkpoint["image_size"], checkpoint["stored_size"], checkpoint["stage"]) == (64, 32, "pretrain")
    assert checkpoint["args"]["lr"] == 0.02 and checkpoint["mean"] == [0.485, 0.456, 0.406]
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in checkpoint["model"])
    rows = training_log(pretrained)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "images_per_s"} <= set(rows[0])
    best = max(rows, key=lambda r: (float(r["val_acc"]), -float(r["val_loss"])))  # a tie: the lower loss
    assert checkpoint["epoch"] == int(best["epoch"])
    report = json.loads(pretrained.with_suffix(".test.json").read_text())
    assert report["images"] == 18
    assert len(report["confusion_matrix"]) == 3
    assert set(report["per_class_accuracy"]) == {"blue", "green", "red"}
    assert sum(map(sum, report["confusion_matrix"])) == 18
    assert checkpoint["test_metrics"]["accuracy"] == report["accuracy"]
    last = torch.load(pretrained.with_suffix(".last.pt"), weights_only=True)
    assert last["finished"] and last["epoch"] == 2 and "optimizer" in last


@pytest.mark.slow
def test_finetune_to_other_classes_changes_only_the_head(pretrained, tmp_path):
    other = make_class_folders(tmp_path / "other", classes=("w", "x", "y", "z"), train=8, test=3, size=40)
    out = tmp_path / "finetune.pt"
    result = run("finetune.py", "--checkpoint", pretrained, "--data-dir", other, "--out", out, "--epochs", "1",
                 "--val-size", "4", *QUICK_NO_HIDDEN)
    assert "132 trainable parameters" in result.stdout  # 32 x 4 + 4: the new head alone
    # the preprocessing the checkpoint was trained with, not this folder's 40 px (before: taken without a word)
    assert f"--stored-size 32: the size {pretrained} stored its training images at" in result.stdout
    assert "(the starting weights)" not in result.stdout  # a new head never competes as epoch 0
    tuned, source = torch.load(out, weights_only=True), torch.load(pretrained, weights_only=True)
    assert tuned["model_args"] == {"num_classes": 4, "dropout": 0.5, "hidden": (64, 32)}  # the checkpoint's widths
    assert tuned["classes"] == ["w", "x", "y", "z"]
    assert tuned["stored_size"] == 32
    for name, tensor in tuned["model"].items():
        if not name.startswith("classifier.6."):
            assert torch.equal(tensor, source["model"][name]), name
    assert json.loads(out.with_suffix(".test.json").read_text())["images"] == 12
    predicted = run("predict.py", other / "test", "--checkpoint", out, "--device", "cpu")
    assert "12 labelled images: accuracy" in predicted.stdout
    assert all(line.split("\t")[1] in "wxyz" for line in predicted.stdout.splitlines() if "\t" in line)


def test_a_given_stored_size_or_image_size_wins_over_the_checkpoints(pretrained, tmp_path, capsys):
    """The checkpoint's preprocessing is taken only for the flags not given: a given --stored-size (or --image-size)
    wins, in another data folder as in its own."""
    import finetune
    checkpoint = torch.load(pretrained, weights_only=True)
    assert (checkpoint["image_size"], checkpoint["stored_size"]) == (64, 32)
    for data_dir in (tmp_path, checkpoint["args"]["data_dir"]):
        argv = ["--checkpoint", str(pretrained), "--data-dir", str(data_dir), "--stored-size", "40"]
        for given, expected in (([], (64, 40)), (["--image-size", "96"], (96, 40))):
            args, names = finetune.parse_flags(finetune.build_parser(), argv + given)
            finetune.take_preprocessing(args, names, checkpoint)
            assert (args.image_size, args.stored_size) == expected
    assert "--stored-size" not in capsys.readouterr().out


@pytest.mark.slow
def test_finetune_on_the_same_classes_keeps_the_trained_head_and_never_validates_below_its_start(
        pretrained, tiny_data, tmp_path):
    out = tmp_path / "finetune.pt"
    # an lr too small to change any weight: no epoch can beat the starting weights, which must then be kept
    result = run("finetune.py", "--checkpoint", pretrained, "--data-dir", tiny_data, "--out", out, "--epochs", "1",
                 "--val-size", "6", *QUICK_NO_HIDDEN, "--lr", "1e-30")
    assert "the head starts from its weights" in result.stdout and "optimistic" not in result.stderr
    assert "--stored-size" not in result.stdout  # its own data folder: the run's flag, the same image cache
    assert "epoch   0/1  (the starting weights)" in result.stdout
    # epoch 0 is in the log too (validation alone: its training columns empty); before, the log began at epoch 1
    log = training_log(out)
    assert [row["epoch"] for row in log] == ["0", "1"] and log[0]["train_loss"] == log[0]["lr"] == ""
    # and the curves draw it: a validation dot a quarter of the way across the loss panel (epochs -0.5 to 1.5)
    curves = np.asarray(Image.open(out.with_suffix(".png")).convert("RGB"))[84:]  # below the legend
    columns = np.argwhere((curves == predict.CURVE_COLOURS["validation"]).all(2))[:, 1]
    assert any(abs(column - (70 + (344 - 70) / 4)) <= 3 for column in columns)
    tuned, source = torch.load(out, weights_only=True), torch.load(pretrained, weights_only=True)
    assert float(log[0]["val_acc"]) == tuned["metrics"]["val_acc"]
    assert (log[0]["code"], log[0]["torch"]) == (tuned["code"], torch.__version__)  # as every row: who made it
    assert tuned["epoch"] == 0
    assert tuned["metrics"]["val_acc"] == source["test_metrics"]["val_acc"]  # the same split
    assert all(torch.equal(tensor, source["model"][name]) for name, tensor in tuned["model"].items())
    assert tuned["test_metrics"]["accuracy"] == source["test_metrics"]["accuracy"]


@pytest.mark.slow
def test_finetune_new_head_and_a_warning_when_validation_overlaps_the_checkpoints_training(
        pretrained, tiny_data, tmp_path):
    out = tmp_path / "finetune.pt"
    result = run("finetune.py", "--checkpoint", pretrained, "--data-dir", tiny_data, "--out", out, "--epochs", "1",
                 "--val-size", "6", *QUICK_NO_HIDDEN, "--lr", "1e-30", "--new-head", "--seed", "1")
    assert "the head starts from" not in result.stdout
    assert "--seed 1 (the checkpoint's run: 0)" in result.stderr and "optimistic" in result.stderr
    # a new head is random: it never competes as epoch 0, even when epoch 1 only ties it (before: epoch 0 was kept)
    assert "(the starting weights)" not in result.stdout and torch.load(out, weights_only=True)["epoch"] == 1
    tuned = torch.load(out.with_suffix(".last.pt"), weights_only=True)
    source = torch.load(pretrained, weights_only=True)
    # not trained: new
    assert not torch.equal(tuned["model"]["classifier.6.weight"], source["model"]["classifier.6.weight"])
    assert torch.equal(tuned["model"]["classifier.4.weight"], source["model"]["classifier.4.weight"])


@pytest.mark.slow
def test_the_overlap_warning_knows_the_data_folder_by_any_name(tmp_path):
    """Before: a run on --data-dir data in its folder, fine-tuned from another folder with the same data folder named
    absolutely, gave no warning: the checkpoint's relative name was taken in finetune's folder."""
    make_class_folders(tmp_path / "run" / "data", train=4, test=1)
    run("pretrain.py", "--data-dir", "data", "--out", "p.pt", "--epochs", "1", "--val-size", "3", *QUICK,
        cwd=tmp_path / "run")
    (tmp_path / "linked").symlink_to(tmp_path / "run" / "data")
    for data_dir in (tmp_path / "run" / "data", "linked"):
        result = run("finetune.py", "--checkpoint", tmp_path / "run" / "p.pt", "--data-dir", data_dir, "--out",
                     "f.pt", "--overwrite", "--epochs", "1", "--val-size", "3", "--seed", "1", *QUICK_NO_HIDDEN,
                     cwd=tmp_path)
        assert "--seed 1 (the checkpoint's run: 0)" in result.stderr and "optimistic" in result.stderr
    # before: none once an image was added or removed, with the run's own flags (its split drawn anew: most of the
    # validation images trained the checkpoint)
    (tmp_path / "run" / "data" / "train" / "red" / "0000.png").rename(tmp_path / "run" / "data" / "train" / "x.png")
    result = run("finetune.py", "--checkpoint", tmp_path / "run" / "p.pt", "--data-dir", "linked", "--out", "f.pt",
                 "--overwrite", "--epochs", "1", "--val-size", "3", *QUICK_NO_HIDDEN, cwd=tmp_path)
    assert ("warning: linked/train changed since its run (images added, removed or modified): this validation split "
            "holds images") in result.stderr


@pytest.mark.parametrize("mode,frozen,changed", [("classifier", "features.0.weight", "classifier.1.weight"),
                                                 ("full", None, "features.0.weight")])
@pytest.mark.slow
def test_finetune_modes_train_their_layers(pretrained, tiny_data, tmp_path, mode, frozen, changed):
    out = tmp_path / "finetune.pt"
    run("finetune.py", "--checkpoint", pretrained, "--data-dir", tiny_data, "--out", out, "--epochs", "1",
        "--val-size", "6", "--mode", mode, *QUICK_NO_HIDDEN)
    # the last epoch's weights, which trained whatever the validation score
    tuned = torch.load(out.with_suffix(".last.pt"), weights_only=True)["model"]
    source = torch.load(pretrained, weights_only=True)["model"]
    assert not torch.equal(tuned[changed], source[changed])
    if frozen:
        assert torch.equal(tuned[frozen], source[frozen])


@pytest.mark.slow
def test_a_run_stopped_by_sigint_then_sigterm_resumes_to_identical_weights(tiny_data, tmp_path):
    whole = tmp_path / "whole" / "pretrain.pt"
    run("pretrain.py", *start(whole, 2, tiny_data))

    parts = tmp_path / "parts" / "pretrain.pt"
    resume = ["--resume", parts.with_suffix(".last.pt")]
    message = stop_during("epoch 1/2", signal.SIGINT, start(parts, 2, tiny_data))
    assert "stopped by SIGINT at " in message and f"--resume {parts.with_suffix('.last.pt')}" in message
    message = stop_during("epoch 2/2", signal.SIGTERM, start(parts, 2, tiny_data, *resume))
    assert "stopped by SIGTERM at " in message
    resumed = run("pretrain.py", *start(parts, 2, tiny_data, *resume))
    assert "resuming pretrain" in resumed.stdout

    for suffix, key in ((".pt", "model"), (".last.pt", "model"), (".last.pt", "ema")):
        a = torch.load(whole.with_suffix(suffix), weights_only=True)[key]
        b = torch.load(parts.with_suffix(suffix), weights_only=True)[key]
        assert all(torch.equal(a[k], b[k]) for k in a), (suffix, key)
    strip = lambda text: [line.split(",")[:5] for line in text.splitlines()]  # noqa: E731 (timings differ)
    assert strip(whole.with_suffix(".csv").read_text()) == strip(parts.with_suffix(".csv").read_text())


class SavedTogether:
    """Wraps CheckpointWriter.save_together: records the file names of each call, in order."""

    def __init__(self, save_together) -> None:
        self.save_together = save_together
        self.calls: list[list[str]] = []

    def __get__(self, writer, owner):  # looked up on a writer, it is that writer's method
        return functools.partial(self, writer)

    def __call__(self, writer, files: dict) -> None:
        self.calls.append([os.path.basename(path) for path in files])
        self.save_together(writer, files)


@pytest.mark.slow
def test_an_epochs_best_checkpoint_and_resume_state_are_saved_together_best_first(tiny_data, tmp_path, monkeypatch):
    """So that a killed run never leaves a resume state naming a best epoch that --out does not hold yet."""
    import pretrain
    saves = SavedTogether(cli.CheckpointWriter.save_together)
    monkeypatch.setattr(cli.CheckpointWriter, "save_together", saves)
    pretrain.main(["--data-dir", str(tiny_data), "--out", str(tmp_path / "p.pt"), "--epochs", "2", "--val-size", "6",
                   *QUICK])
    assert saves.calls[0] == ["p.pt", "p.last.pt"]  # the first epoch always improves on nothing
    assert saves.calls[1] in (["p.pt", "p.last.pt"], ["p.last.pt"]) and len(saves.calls) == 2


def test_a_tie_in_validation_accuracy_goes_to_the_lower_loss(tiny_data, tmp_path, monkeypatch, capsys):
    """Before: the first epoch of a tie was kept, on a small set often while the loss fell for many epochs after it.
    A resume state saved before (its best without a loss) goes on, its kept epoch's loss read from its log."""
    import pretrain
    # epoch 2: the same accuracy, a lower loss; 3 and 4: higher than 2's (the kept one's), lower than 1's
    scripted = iter([(0.5, 1.0), (0.5, 0.7), (0.5, 0.9), (0.5, 0.8)])
    monkeypatch.setattr(pretrain, "evaluate", lambda *args: dict(zip(("accuracy", "loss"), next(scripted))))
    pretrain.main(["--data-dir", str(tiny_data), "--out", str(tmp_path / "p.pt"), "--epochs", "3", "--val-size", "6",
                   *QUICK])
    assert "best validation accuracy 50.00% at epoch 2" in capsys.readouterr().out
    state = torch.load(tmp_path / "p.last.pt", weights_only=True)
    state["best"] = {key: state["best"][key] for key in ("val_acc", "epoch")}  # an older state's: no loss
    torch.save(state, tmp_path / "p.last.pt")
    pretrain.main(["--resume", str(tmp_path / "p.last.pt"), "--epochs", "4"])  # before: its tie won, over a lower loss
    assert torch.load(tmp_path / "p.pt", weights_only=True)["epoch"] == 2
    assert [row["epoch"] for row in training_log(tmp_path / "p.pt")] == ["1", "2", "3", "4"]


@pytest.mark.slow
def test_a_resumed_epochs_speed_and_seconds_count_its_steps_before_the_stop(tiny_data, tmp_path, monkeypatch):
    import pretrain
    clock, train_step = types.SimpleNamespace(now=0.0), pretrain.train_step

    def timed_step(*args):  # pretrain.py's clock: a second a training step, no time elsewhere
        clock.now += 1
        return train_step(*args)
    monkeypatch.setattr(pretrain, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))
    monkeypatch.setattr(pretrain, "train_step", timed_step)
    monkeypatch.setattr(cli.Processes, "any", lambda self, flag: clock.now == 2)  # a stop after the second step
    with pytest.raises(SystemExit):
        pretrain.main(list(map(str, start(tmp_path / "p.pt", 1, tiny_data))))
    monkeypatch.setattr(cli.Processes, "any", lambda self, flag: False)
    pretrain.main(["--resume", str(tmp_path / "p.last.pt"), "--epochs", "2"])  # and the next epoch from 0 s
    rows = training_log(tmp_path / "p.pt")  # 42 training images, batches of 8: 6 steps, 6 seconds an epoch
    assert [(float(row["images_per_s"]), float(row["epoch_s"])) for row in rows] == [(42 / 6, 6.0)] * 2


@pytest.mark.slow
def test_a_resume_may_not_end_before_where_the_run_stopped_and_says_a_stretched_cosine(tiny_data, tmp_path,
                                                                                        monkeypatch, capsys):
    """Before: --epochs 1 on a run stopped in epoch 2 tested at once, its steps there dropped without a word and the
    state left unfinished (a later resume trained on and tested again; also with --epochs 1 after a stop at the end
    of epoch 1); a longer cosine changed the rate unsaid."""
    import pretrain
    steps, train_step = types.SimpleNamespace(done=0, stop_at=6), pretrain.train_step

    def counted_step(*args):
        steps.done += 1
        return train_step(*args)
    monkeypatch.setattr(pretrain, "train_step", counted_step)
    monkeypatch.setattr(cli.Processes, "any", lambda self, flag: steps.done == steps.stop_at)  # 6 steps an epoch
    with pytest.raises(SystemExit):
        pretrain.main(list(map(str, start(tmp_path / "e.pt", 3, tiny_data))))  # stopped at the end of epoch 1
    pretrain.main(["--resume", str(tmp_path / "e.last.pt"), "--epochs", "1"])
    assert torch.load(tmp_path / "e.last.pt", weights_only=True)["finished"]
    steps.done, steps.stop_at = 0, 8  # epoch 2, step 2
    with pytest.raises(SystemExit):
        pretrain.main(list(map(str, start(tmp_path / "p.pt", 3, tiny_data, "--lr-schedule", "cosine"))))
    capsys.readouterr()
    last = str(tmp_path / "p.last.pt")
    with pytest.raises(SystemExit) as refused:
        pretrain.main(["--resume", last, "--epochs", "1"])
    assert refused.value.code == (f"pretrain.py: --epochs 1: --resume {last} stopped at epoch 2, step 2; pass "
                                  "--epochs 2 or more to finish it, or leave --epochs out")
    pretrain.main(["--resume", last, "--epochs", "4"])
    assert ("note: --epochs 4 with --lr-schedule cosine: from here the rate follows the cosine over 4 epochs, not "
            "the 3 it followed until now\n") in capsys.readouterr().err


@pytest.mark.slow
def test_a_resume_of_a_tested_run_gives_its_report_without_looking_at_the_test_split_again(tiny_data, tmp_path,
                                                                                             monkeypatch, capsys):
    """`invoke all --resume` after a stop in finetune resumes the finished pretrain run: before, its test split (and
    validation, for the temperature) was evaluated again; the test set is looked at once per stage. The checkpoint is
    not rewritten; the report names where it is now. A run tested before calibration is tested again."""
    import pretrain
    out = tmp_path / "a" / "p.pt"
    pretrain.main(list(map(str, start(out, 1, tiny_data))))
    report = json.loads(out.with_suffix(".test.json").read_text())
    out.parent.rename(tmp_path / "b")
    out = tmp_path / "b" / "p.pt"
    out.with_suffix(".test.json").unlink()
    written = out.stat().st_mtime_ns
    looks, split_logits = [], pretrain.split_logits
    monkeypatch.setattr(pretrain, "split_logits", lambda *args: looks.append(args[1]) or split_logits(*args))
    capsys.readouterr()
    pretrain.main(["--resume", str(out.with_suffix(".last.pt"))])
    assert looks == [] and out.stat().st_mtime_ns == written
    assert json.loads(out.with_suffix(".test.json").read_text()) == report | {"checkpoint": str(out)}
    assert "evaluated once with those weights (when the run finished):\ntest: accuracy" in capsys.readouterr().out
    checkpoint = torch.load(out, weights_only=True)
    del checkpoint["temperature"]  # as runs tested before the temperature was kept
    torch.save(checkpoint, out)
    pretrain.main(["--resume", str(out.with_suffix(".last.pt"))])
    assert len(looks) == 2 and "temperature" in torch.load(out, weights_only=True)


@pytest.mark.slow
def test_resume_takes_the_runs_flags_and_extends_epochs(tiny_data, tmp_path):
    out = tmp_path / "pretrain.pt"
    run("pretrain.py", *start(out, 1, tiny_data, "--lr", "0.03"))
    last = out.with_suffix(".last.pt")
    finished = run("pretrain.py", "--resume", last)  # nothing to train: the test report again
    assert f"resuming pretrain from {last} at the end of epoch 1;" in finished.stdout  # not "epoch 2", none there
    assert "already finished 1 epochs (pass a larger --epochs to train further)" in finished.stdout
    assert "test: accuracy" in finished.stdout
    changed = run("pretrain.py", "--resume", last, "--epochs", "2", "--lr", "0.5", "--seed", "3", check=False)
    assert changed.returncode == 1
    assert "--lr 0.5 (the run used 0.03), --seed 3 (the run used 0)" in changed.stderr
    assert changed.stderr.count("\n") == 1
    extended = run("pretrain.py", "--resume", last, "--epochs", "2")
    assert "epoch   2/2" in extended.stdout
    state = torch.load(last, weights_only=True)
    assert state["epoch"] == 2 and state["args"]["lr"] == 0.03 and state["args"]["epochs"] == 2


def test_resume_from_a_missing_file_is_an_error_not_a_fresh_start(tiny_data, tmp_path):
    result = run("pretrain.py", "--data-dir", tiny_data, "--out", tmp_path / "p.pt",
                 "--resume", tmp_path / "nope.last.pt", *QUICK, check=False)
    assert result.returncode == 1 and "nope.last.pt: no such checkpoint file" in result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "p.pt").exists()


@pytest.mark.slow
def test_init_from_a_torchvision_state_dict(tiny_data, tmp_path):
    weights = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), weights)
    result = run("pretrain.py", "--data-dir", tiny_data, "--out", tmp_path / "p.pt", "--epochs", "1",
                 "--val-size", "6", "--init", weights, *QUICK_NO_HIDDEN)  # the reference's widths
    expected = ("loaded 12 tensors; kept fresh (name or shape differs): "
                "classifier.4.bias, classifier.4.weight, classifier.6.bias")
    assert expected in result.stdout


def test_init_imagenet_without_network_is_one_clear_line(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no weights cached: they must be fetched
    for proxy in ("https_proxy", "HTTPS_PROXY"):  # a port nothing listens on: the fetch fails at once
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")
    result = run("pretrain.py", "--data-dir", tiny_data, "--out", tmp_path / "p.pt", "--init", "imagenet", *QUICK,
                 check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert "--init imagenet: cannot get torchvision's ImageNet AlexNet weights" in last_line


@pytest.mark.parametrize("held, kind", [
    (torch.zeros(3), "Tensor"),
    ([torch.zeros(3)], "list"),
    ({"features.0.weight": 1}, "dict"),
    ({"model": [torch.zeros(3)], "classes": ["a"]}, "list"),  # a checkpoint-like dict whose model is no state dict
])
def test_init_that_is_no_state_dict_is_one_line(tiny_data, tmp_path, held, kind):
    init = tmp_path / "init.pt"
    torch.save(held, init)
    result = run("pretrain.py", "--data-dir", tiny_data, "--out", tmp_path / "p.pt", "--init", init, "--epochs", "1",
                 "--val-size", "6", *QUICK, check=False)
    assert error_line(result) == (f"pretrain.py: --init {init}: not a state dict (it holds a {kind}, not names mapped "
                                  "to tensors); pass a torchvision AlexNet state dict or a checkpoint of this project")
    assert not (tmp_path / "p.pt").exists()


@pytest.mark.parametrize("kind, message", [
    ("bytes", "not a checkpoint file (not a PyTorch zip archive, or damaged)"),
    ("folder", "is a folder; pass a checkpoint file"),
    ("missing", "no such checkpoint file"),
])
def test_an_init_file_that_cannot_be_loaded_is_one_line_without_unsafe_advice(tiny_data, tmp_path, kind, message):
    init = tmp_path / "init.pt"
    if kind == "bytes":
        init.write_bytes(bytes(range(256)) * 20)
    elif kind == "folder":
        init.mkdir()
    result = run("pretrain.py", "--data-dir", tiny_data, "--out", tmp_path / "p.pt", "--init", init, "--epochs", "1",
                 "--val-size", "6", *QUICK, check=False)
    line = error_line(result)
    assert line.startswith(f"pretrain.py: --init {init}: {message}") and line.endswith("; or pass 'imagenet'")
    assert "weights_only" not in result.stderr and not (tmp_path / "p.pt").exists()


@pytest.mark.parametrize("flags,message", [
    (["--epochs", "0"], "--epochs: must be a positive integer"),
    (["--batch-size", "-4"], "--batch-size: must be a positive integer"),
    (["--lr", "0"], "--lr: must be a positive number"),
    (["--lr", "-0.1"], "--lr: must be a positive number, got -0.1"),
    (["--image-size", "62"], "--image-size: AlexNet needs images of at least 63 px"),
    (["--image-size", "1025"], "--image-size: at most 1024 px"),
    (["--ema", "1"], "--ema: must be at least 0 and below 1"),
    (["--cutout", "1"], "--cutout: must be at least 0 and below 1"),
    (["--epochs", "two"], "--epochs: invalid positive_int value"),
    (["--hidden", "64"], "--hidden: must be two positive integers with a comma between, e.g. 4096,1024, got 64"),
    (["--hidden", "64,0"], "--hidden: must be two positive integers with a comma between, e.g. 4096,1024, got 64,0"),
    (["--hidden", "wide,narrow"], "--hidden: must be two positive integers with a comma between, e.g. 4096,1024, "
     "got wide,narrow"),
])
def test_bad_flags_are_argparse_errors(flags, message):
    result = run("pretrain.py", *flags, check=False)
    assert result.returncode == 2 and message in result.stderr


def test_unknown_finetune_mode():
    result = run("finetune.py", "--mode", "everything", check=False)
    assert result.returncode == 2 and "invalid choice: 'everything'" in result.stderr


def test_val_size_larger_than_the_data(tiny_data, tmp_path):
    result = run("pretrain.py", "--data-dir", tiny_data, "--out", tmp_path / "p.pt", "--val-size", "500", *QUICK,
                 check=False)
    assert result.returncode == 1 and "--val-size 500: must be between 1 and 47" in result.stderr


@pytest.mark.parametrize("amx, avx512_bf16", [(True, False), (False, True), (False, False)])
def test_precision_auto_takes_cudas_path_on_a_cpu_with_bf16_units_and_stays_fp32_without(
        amx, avx512_bf16, tiny_data, tmp_path, monkeypatch):
    import pretrain
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    native = amx or avx512_bf16
    args = pretrain.make_parser("", "pretrain").parse_args(["--device", "cpu"])
    model = AlexNet(num_classes=3, hidden=(64, 32))
    run_ = pretrain.start_run(args, "pretrain", cli.Processes("cpu"), model, list(model.parameters()), None)
    optimizer, bf16 = run_.optimizer, run_.bf16
    assert bf16 is native and optimizer.defaults["fused"] is (True if native else None)
    assert model.features[0].weight.is_contiguous(memory_format=torch.channels_last) is native
    result = run("pretrain.py", "--data-dir", tiny_data, "--out", tmp_path / "p.pt", "--epochs", "1",
                 "--val-size", "6", *QUICK)
    arithmetic = "bf16 autocast, channels_last, fused SGD" if native else "fp32"
    assert f"on cpu, {arithmetic} (--precision auto)," in result.stdout
    if amx:  # where auto would take bf16, fp32 can still be asked for
        fp32 = run("pretrain.py", "--data-dir", tiny_data, "--out", tmp_path / "q.pt", "--epochs", "1",
                   "--val-size", "6", *QUICK, "--precision", "fp32")
        assert "on cpu, fp32 (--precision fp32)," in fp32.stdout


def test_the_start_line_names_channels_last_and_the_fused_sgd_wherever_they_are_used(capsys):
    """fp32 on CUDA takes channels_last and the fused SGD too (start_run): the line said "fp32" alone there."""
    import dataclasses
    import pretrain
    images = data.ImageSet(torch.zeros(6, 3, 8, 8, dtype=torch.uint8), torch.arange(6) % 3, ["a", "b", "c"])
    args = pretrain.make_parser("", "pretrain").parse_args(["--precision", "fp32", "--device", "cpu"])
    model = AlexNet(num_classes=3, hidden=(64, 32))
    run_ = pretrain.start_run(args, "pretrain", cli.Processes("cpu"), model, list(model.parameters()),
                              images, images, images)
    for layout, said in ((torch.contiguous_format, "fp32 (--precision fp32)"),
                         (torch.channels_last, "fp32, channels_last, fused SGD (--precision fp32)")):
        pretrain.announce(dataclasses.replace(run_, layout=layout), pretrain.Progress({}), None)
        assert f"on cpu, {said}, " in capsys.readouterr().out


def test_a_bf16_step_on_the_cpu_convolves_nhwc_in_bf16_and_updates_fp32_weights():
    import pretrain
    args = pretrain.make_parser("", "pretrain").parse_args(["--precision", "bf16", "--image-size", "64"])
    model = AlexNet(num_classes=3, hidden=(64, 32))
    images, labels = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.arange(8) % 3
    run_ = pretrain.start_run(args, "pretrain", cli.Processes("cpu"), model, list(model.parameters()),
                              data.ImageSet(images, labels, ["a", "b", "c"]))
    seen = []
    model.features[0].register_forward_hook(
        lambda module, inputs, output: seen.append((inputs[0].is_contiguous(memory_format=torch.channels_last),
                                                    output.dtype)))
    before = model.features[0].weight.detach().clone()
    loss, _ = pretrain.train_step(run_, images, labels, 8)
    assert seen == [(True, torch.bfloat16)] and torch.isfinite(loss)
    weight = model.features[0].weight
    assert weight.dtype == torch.float32 and not torch.equal(weight, before)


@pytest.mark.slow
def test_bf16_autocast_and_compile_train_and_save_plain_names(tiny_data, tmp_path):
    out = tmp_path / "pretrain.pt"
    # 32 training images, two whole batches: a last batch of 10 (--val-size 6) cost a second compile, 10 s of 40
    result = run("pretrain.py", "--data-dir", tiny_data, "--out", out, "--epochs", "1", "--val-size", "16", *QUICK,
                 "--precision", "bf16", "--compile")
    assert "on cpu, bf16 autocast, channels_last, fused SGD (--precision bf16), compiled" in result.stdout
    checkpoint = torch.load(out, weights_only=True)
    assert not any(name.startswith(("module.", "_orig_mod.")) for name in checkpoint["model"])
    assert all(t.dtype == torch.float32 for t in checkpoint["model"].values())  # autocast keeps fp32 weights
    assert json.loads(out.with_suffix(".test.json").read_text())["loss"] < 10


def test_learning_rate_schedules():
    from argparse import Namespace

    from pretrain import learning_rate
    args = Namespace(lr=0.1, epochs=4, warmup_epochs=1.0, lr_schedule="cosine")
    rates = [learning_rate(args, epoch, step, 10) for epoch in range(4) for step in range(10)]
    assert rates[:10] == pytest.approx([0.01 * (i + 1) for i in range(10)])  # linear warm-up over epoch 1
    assert rates[10] < 0.1
    assert all(a > b for a, b in zip(rates[10:], rates[11:]))
    assert rates[-1] == pytest.approx(0, abs=1e-12)
    assert rates[24] == pytest.approx(0.05, abs=0.005)  # half-way through the cosine, half the rate
    constant = Namespace(lr=0.1, epochs=4, warmup_epochs=0.0, lr_schedule="constant")
    assert {learning_rate(constant, e, s, 10) for e in range(4) for s in range(10)} == {0.1}


@pytest.mark.slow
def test_recipe_flags_reach_the_training_step(tiny_data, tmp_path):
    out = tmp_path / "pretrain.pt"
    run("pretrain.py", "--data-dir", tiny_data, "--out", out, "--epochs", "2", "--val-size", "6", *QUICK,
        "--augment", "crop", "--lr-schedule", "cosine", "--warmup-epochs", "0.5", "--label-smoothing", "0.4",
        "--cutout", "0.25")
    rows = training_log(out)
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.02 * 0.5 * (1 + math.cos(math.pi * 1 / 3)), 0.0])
    args = torch.load(out, weights_only=True)["args"]
    recipe = (args["augment"], args["label_smoothing"], args["lr_schedule"], args["cutout"])
    assert recipe == ("crop", 0.4, "cosine", 0.25)


@pytest.mark.parametrize("flag", ["label_smoothing", "cutout"])
def test_recipe_flag_changes_the_training_loss(flag):
    from model import AlexNet
    from cli import Processes
    from pretrain import make_parser, start_run, train_step
    images, labels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.tensor([0, 1, 2, 0])
    losses = []
    for value in (0.0, 0.5):
        torch.manual_seed(0)
        model = AlexNet(num_classes=3, hidden=(64, 32))
        args = make_parser("", "pretrain").parse_args(["--image-size", "63", "--precision", "fp32",
                                                       f"--{flag.replace('_', '-')}", str(value)])
        run_ = start_run(args, "pretrain", Processes("cpu"), model, list(model.parameters()),
                         data.ImageSet(images, labels, ["a", "b", "c"]))
        loss, _ = train_step(run_, images, labels, 4)
        losses.append(loss.item())
    assert losses[0] != pytest.approx(losses[1], abs=1e-4)


@pytest.mark.parametrize("script", ["pretrain.py", "finetune.py", "predict.py", "download.py", "export.py"])
def test_help_shows_every_default(script):
    text = run(script, "--help", process=script == "export.py").stdout  # no other test starts export.py as a file
    assert "(default: None)" not in " ".join(text.split())
    if script.endswith("train.py") or script == "finetune.py":
        assert "passes over the training images (default: 40)" in text and "SGD momentum (default: 0.9)" in text
    if script == "finetune.py":  # the checkpoint's sizes, as a run says them (not pretrain's 224 and its cache's)
        assert "side of the network's input (default: the checkpoint's)" in " ".join(text.split())
        assert "side the images are cached at (default: the checkpoint's)" in " ".join(text.split())


@pytest.mark.slow
def test_ema_weights_are_kept_and_tta_reaches_predict(tiny_data, tmp_path):
    from model import load_checkpoint, model_from_checkpoint
    from predict import compute_logits
    import data
    out = tmp_path / "pretrain.pt"
    run("pretrain.py", "--data-dir", tiny_data, "--out", out, "--epochs", "1", "--val-size", "6", *QUICK,
        "--ema", "0.5", "--tta", "--batch-size", "8")
    kept, last = torch.load(out, weights_only=True), torch.load(out.with_suffix(".last.pt"), weights_only=True)
    assert kept["tta"] is True and last["ema"]["n_averaged"].item() == 6  # one update per step: 42 images, 8 a step
    assert all(torch.equal(kept["model"][k], last["ema"]["module." + k]) for k in kept["model"])
    assert not torch.equal(kept["model"]["classifier.6.weight"], last["model"]["classifier.6.weight"])

    test = data.load_folder(tiny_data / "test")
    model = model_from_checkpoint(load_checkpoint(out))
    temperature = kept["temperature"]  # fitted on validation: predict's probabilities are calibrated with it
    mirrored = torch.softmax(compute_logits(model, test.images.split(256), 64, flip=True) / temperature, 1)
    plain = torch.softmax(compute_logits(model, test.images.split(256), 64) / temperature, 1)
    result = run("predict.py", tiny_data / "test", "--checkpoint", out, "--device", "cpu", "--json", "--topk", "3")
    output = json.loads(result.stdout)
    got = torch.tensor([
        [t["probability"] for t in sorted(p["top"], key=lambda t: t["label"])]
        for p in output["predictions"]
    ])
    assert torch.allclose(got, mirrored, atol=1e-5) and not torch.allclose(got, plain, atol=1e-6)


@pytest.mark.slow
def test_finetune_resumes_with_its_mode(pretrained, tiny_data, tmp_path):
    out = tmp_path / "finetune.pt"
    run("finetune.py", "--checkpoint", pretrained, "--data-dir", tiny_data, "--out", out, "--epochs", "1",
        "--val-size", "6", *QUICK_NO_HIDDEN)
    resumed = run("finetune.py", "--resume", out.with_suffix(".last.pt"), "--epochs", "2")
    assert "resuming finetune" in resumed.stdout
    assert "99 trainable parameters" in resumed.stdout  # still the head only (32 x 3 + 3)
    tuned = torch.load(out.with_suffix(".last.pt"), weights_only=True)
    source = torch.load(pretrained, weights_only=True)
    assert tuned["epoch"] == 2
    assert torch.equal(tuned["model"]["features.0.weight"], source["model"]["features.0.weight"])


def test_a_log_whose_rows_have_other_columns_is_written_whole(tmp_path):
    """Rows made by other code (a run resumed by an older checkout, then by this one) may lack columns of the others:
    the log has every row's columns, the newest row's first (before: csv's ValueError, a traceback)."""
    rows = [{"epoch": 1, "val_acc": 0.5, "code": "commit a"}, {"epoch": 2, "lr": 0.1, "val_acc": 0.75}]
    write_csv(tmp_path / "p.csv", rows)
    assert (tmp_path / "p.csv").read_text().splitlines() == ["epoch,lr,val_acc,code", "1,,0.5,commit a", "2,0.1,0.75,"]


@pytest.mark.parametrize("epochs, eta", [(26, r"eta 25:00:00"), (10**20, r"eta \d{20,}:\d\d:\d\d")])
def test_an_eta_beyond_a_day_is_shown_in_hours_not_wrapped_or_a_traceback(capsys, epochs, eta):
    row = {"epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "val_loss": 1.0, "val_acc": 0.5, "images_per_s": 1.0,
           "epoch_s": 3600.0}
    print_epoch([row], epochs, improved=False)  # before: 01:00:00 (strftime's %H), an OverflowError
    assert re.search(eta, capsys.readouterr().out)
    # a fine-tune's epoch 0 (its starting weights validated, nothing trained) takes no time from the estimate
    print_epoch([{"epoch": 0, "val_loss": 1.0, "val_acc": 0.5}, row], epochs, improved=False)
    assert re.search(eta, capsys.readouterr().out)
    stream = io.StringIO()
    progress = ProgressLine("epoch 1/1", total=10**9, stream=stream)
    progress.started -= 3600  # an hour for the first 10 images: the rest take over a day
    progress.show(10)
    assert re.search(r"eta \d{5,}:\d\d:\d\d\n", stream.getvalue())


def moved_resume(tiny_data, folder, change) -> dict:
    """The resume state of a 1-epoch run, changed as a run moved to another device leaves it (`change(state)`), resumed
    to 2 epochs: its .last.pt."""
    out = folder / "p.pt"
    run("pretrain.py", *start(out, 1, tiny_data))
    state = torch.load(out.with_suffix(".last.pt"), weights_only=True)
    change(state)
    torch.save(state, out.with_suffix(".last.pt"))
    run("pretrain.py", "--resume", out.with_suffix(".last.pt"), "--epochs", "2")
    return torch.load(out.with_suffix(".last.pt"), weights_only=True)


@pytest.mark.slow
def test_a_resume_whose_momentum_has_another_layout_than_its_weights_trains_as_one_that_has_not(tiny_data, tmp_path):
    """A run moved to or from channels_last weights (CUDA, a CPU with bf16 units) resumed momentum of the other layout:
    the fused SGD took it element for element in its weight's layout (wrong on a CPU, refused on CUDA)."""
    def flip_layouts(state):
        for kept in state["optimizer"]["state"].values():
            buffer = kept["momentum_buffer"]
            if buffer.dim() == 4:
                nhwc = buffer.is_contiguous(memory_format=torch.channels_last) and not buffer.is_contiguous()
                kept["momentum_buffer"] = buffer.contiguous(
                    memory_format=torch.contiguous_format if nhwc else torch.channels_last)
    run("pretrain.py", *start(tmp_path / "whole" / "p.pt", 2, tiny_data))
    whole = torch.load(tmp_path / "whole" / "p.last.pt", weights_only=True)
    moved = moved_resume(tiny_data, tmp_path / "flipped", flip_layouts)
    assert all(torch.equal(whole["model"][k], moved["model"][k]) for k in whole["model"])


@pytest.mark.slow
def test_a_resume_on_another_kind_of_device_steps_with_that_devices_sgd(tiny_data, tmp_path):
    """Before: load_state_dict took the saved run's `fused` (a CPU run resumed on CUDA stepped with the foreach SGD
    while its start line said "fused SGD"; a CUDA run on an fp32 CPU, the fused one on contiguous weights)."""
    def other_device(state):
        for group in state["optimizer"]["param_groups"]:
            group["fused"] = None if group.get("fused") else True
    run("pretrain.py", *start(tmp_path / "whole" / "p.pt", 1, tiny_data))
    whole = torch.load(tmp_path / "whole" / "p.last.pt", weights_only=True)
    moved = moved_resume(tiny_data, tmp_path / "moved", other_device)
    assert [group["fused"] for group in moved["optimizer"]["param_groups"]] == [
        group["fused"] for group in whole["optimizer"]["param_groups"]]


@pytest.mark.slow
def test_a_resume_of_a_run_that_augmented_on_another_kind_of_device_goes_on_deterministically(tiny_data, tmp_path):
    """Before: a CUDA generator's state (16 bytes: seed, offset) set on the CPU's (5056), or the reverse, was a
    traceback (the README lets --device change on a resume). Now the draws go on from a seed made of it, each time
    the same."""
    cuda_state = torch.tensor([0, 1234], dtype=torch.int64).view(torch.uint8)
    ends = [moved_resume(tiny_data, tmp_path / f"moved{i}", lambda state: state["rng"].update(augment=cuda_state))
            for i in range(2)]
    assert all(torch.equal(ends[0]["model"][k], ends[1]["model"][k]) for k in ends[0]["model"])


ALLOCATOR = """
import ctypes, sys, torch, cli
class Info(ctypes.Structure):  # glibc's mallinfo2
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]
try:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Info
except (OSError, AttributeError):  # musl, or glibc before 2.33
    sys.exit("no mallinfo2")
if sys.argv[1] == "tuned":  # a training's setup, as pretrain.py and finetune.py start it
    import model, pretrain
    net = model.AlexNet(num_classes=3, hidden=(64, 32))
    pretrain.start_run(pretrain.make_parser("", "pretrain").parse_args(["--device", "cpu"]), "pretrain",
                       cli.Processes("cpu"), net, list(net.parameters()), None)
block = torch.ones(2**24)  # 64 MB, as a training step's gradients and activations
mapped = libc.mallinfo2().hblkhd  # bytes in blocks mapped on their own
del block
print(mapped >= 2**26, libc.mallinfo2().fordblks >= 2**26)  # and after the free: bytes free in the heap
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_training_process_keeps_freed_memory_for_its_next_step():
    """glibc gave each freed block over 32 MB back to the system and the next step mapped it anew, every page zeroed:
    a third of a CPU training step (1.5 x the images/s without). After start_run (its cli.tune_for_training) such a
    block comes from the heap, and stays there once freed."""
    seen = {}
    for setting in ("untuned", "tuned"):
        result = subprocess.run([sys.executable, "-c", ALLOCATOR, setting], cwd=ROOT, capture_output=True, text=True)
        if result.returncode != 0 and "no mallinfo2" in result.stderr:
            pytest.skip("a C library without mallinfo2 (glibc before 2.33, or not glibc)")
        seen[setting] = result.stdout.split() or [result.stderr]
    assert seen == {"untuned": ["True", "False"], "tuned": ["False", "True"]}
