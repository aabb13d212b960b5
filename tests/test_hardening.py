"""Faults met by a hostile but realistic user of training and prediction, each with the real fault where possible."""
import io
import os
import pty
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import cli
import pretrain
from conftest import (QUICK, QUICK_NO_HIDDEN, ROOT, default_signals, error_line, make_class_folders, read_terminal, run,
                      start, stopped_status)
from model import CheckpointError, load_checkpoint


def test_a_really_full_disk_keeps_the_previous_checkpoint(small_filesystem):
    disk = small_filesystem("16m")
    path = disk / "c.pt"
    pretrain.save_checkpoint({"version": 1}, path)
    with pytest.raises(CheckpointError, match="c.pt: cannot write the checkpoint \\(No space left on device\\)"):
        pretrain.save_checkpoint({"version": 2, "weights": torch.zeros(8_000_000)}, path)
    assert torch.load(path, weights_only=True) == {"version": 1} and os.listdir(disk) == ["c.pt"]


def test_a_full_disk_keeps_the_previous_log_and_test_report(small_filesystem):
    disk = small_filesystem("1m")
    log, report = disk / "p.csv", disk / "p.test.json"
    pretrain.write_csv(log, [{"epoch": 1, "val_acc": 0.5}])
    pretrain.write_run_file(report, "test report", lambda f: f.write(b'{"accuracy": 0.5}\n'))
    before = log.read_text()
    with pytest.raises(CheckpointError, match="p.csv: cannot write the training log \\(No space left on device\\); "
                                              "the previous one is untouched: free disk space"):
        pretrain.write_csv(log, [{"epoch": i, "note": "x" * 1000} for i in range(2000)])  # 2 MB
    with pytest.raises(CheckpointError, match="p.test.json: cannot write the test report \\(No space left"):
        pretrain.write_run_file(report, "test report", lambda f: f.write(b"x" * 2_000_000))
    assert log.read_text() == before and report.read_text() == '{"accuracy": 0.5}\n'
    with pytest.raises(CheckpointError, match="p.confusion.png: cannot write the confusion matrix picture \\(No space "
                                              "left on device\\); no part of it was left: free disk space"):
        pretrain.write_run_file(disk / "p.confusion.png", "confusion matrix picture", lambda f: f.write(b"x" * 2**21))
    assert sorted(os.listdir(disk)) == ["p.csv", "p.test.json"]  # no temporary file left


def test_a_resumed_run_on_a_full_disk_is_told_to_resume_again(tiny_data, tmp_path, monkeypatch):
    """Its resume state is on disk before it writes anything: the advice is to resume, not a fresh run's."""
    out = tmp_path / "p.pt"
    run("pretrain.py", *start(out, 1, tiny_data))
    monkeypatch.setattr(cli, "write_atomically", lambda path, write: (_ for _ in ()).throw(OSError(28, "No space")))
    result = run("pretrain.py", "--resume", out.with_suffix(".last.pt"), "--epochs", "2", check=False)
    assert error_line(result).endswith(f"free disk space, then resume with: python pretrain.py --resume "
                                       f"{tmp_path}/p.last.pt"), result.stderr


def test_a_write_failing_on_no_full_disk_is_not_told_to_free_space_and_resume(tiny_data, tmp_path):
    """A folder where the log goes: resuming would fail alike (before: "free disk space, then resume with: ...")."""
    (tmp_path / "p.csv").mkdir()
    result = run("pretrain.py", *start(tmp_path / "p.pt", 1, tiny_data), "--overwrite", check=False)
    assert error_line(result) == (f"pretrain.py: {tmp_path}/p.csv: cannot write the training log (Is a directory); "
                                  "the previous one is untouched: choose another --out")


@pytest.mark.slow
def test_training_onto_a_full_disk_is_one_line(tiny_data, small_filesystem):
    out = small_filesystem("4m") / "p.pt"  # a checkpoint is 12 MB (QUICK's widths)
    result = run("pretrain.py", "--data-dir", tiny_data, "--out", out, "--epochs", "1", "--val-size", "6", *QUICK,
                 check=False)
    # the checkpoints (best, resume state) are written in the background while the epoch's log and curves are
    # written: whichever meets the full disk first is named (the order varies with the load), in one line
    assert re.fullmatch(r"pretrain\.py: .*(p\.(last\.)?pt: cannot write the checkpoint|p\.png: cannot write the "
                        r"learning curves|p\.csv: cannot write the training log) \(No space left on device\).*",
                        error_line(result)), error_line(result)
    assert not out.exists()


def test_grid_in_a_read_only_folder_fails_before_predicting(pretrained, tiny_data, small_filesystem):
    grid = small_filesystem(read_only=True) / "grid.png"
    result = run("predict.py", tiny_data / "test", "--checkpoint", pretrained, "--device", "cpu", "--grid", grid,
                 check=False)
    assert error_line(result) == (f"predict.py: --grid {grid}: cannot write in {grid.parent} (Read-only file system); "
                                  "choose a writable folder") and result.stdout == ""


def test_out_in_a_read_only_folder_fails_before_training(tiny_data, small_filesystem):
    out = small_filesystem(read_only=True) / "p.pt"
    result = run("pretrain.py", "--data-dir", tiny_data, "--out", out, "--epochs", "1", *QUICK, check=False)
    assert error_line(result) == (f"pretrain.py: --out {out}: cannot write in {out.parent} (Read-only file system); "
                                  "choose a writable folder") and "epoch" not in result.stdout


@pytest.mark.parametrize("name, message", [
    ("predictions", "Pillow cannot write a picture named like this; end it in .png or .jpg"),
    # formats Pillow lists as writable that take no RGB picture: before, they failed after every prediction
    *((f"g.{ending}", "Pillow cannot write a picture named like this; end it in .png or .jpg")
      for ending in ("xbm", "msp", "palm", "h5")),
    ("folder", "is a folder; pass a picture file in it, e.g. --grid {folder}/predictions.png"),
    # before: "Pillow cannot write a picture named like this"
    pytest.param("a" * 300 + "/g.png", "cannot reach it (File name too long); choose another --grid", id="too long"),
])
def test_grid_that_is_no_picture_file_fails_before_predicting(pretrained, tiny_data, tmp_path, name, message):
    (tmp_path / "folder").mkdir()
    result = run("predict.py", tiny_data / "test", "--checkpoint", pretrained, "--device", "cpu",
                 "--grid", tmp_path / name, check=False)
    expected = f"predict.py: --grid {tmp_path / name}: " + message.format(folder=tmp_path / "folder")
    assert error_line(result) == expected and result.stdout == ""


@pytest.mark.slow
def test_resume_after_the_training_images_changed_is_refused(tmp_path):
    data = make_class_folders(tmp_path / "data")
    out = tmp_path / "p.pt"
    run("pretrain.py", "--data-dir", data, "--out", out, "--epochs", "1", "--val-size", "6", *QUICK)
    for image in sorted((data / "train" / "red").iterdir())[:4]:
        image.unlink()
    result = run("pretrain.py", "--resume", out.with_suffix(".last.pt"), "--epochs", "2", check=False)
    assert f"the images in {data}/train changed since the run started (added, removed or modified files); " in (
        error_line(result))  # the same size: not said


def test_resume_of_images_stored_at_another_size_is_refused(pretrained, tmp_path):
    """Older code chose a split's stored size otherwise (the most common side): its run, resumed where the cache was
    built again at the median side, went on at the new size without a word, no longer bit-identical."""
    state = torch.load(pretrained.with_suffix(".last.pt"), weights_only=True)
    torch.save(state | {"stored_size": 16}, tmp_path / "pretrain.last.pt")  # as stored by such code
    shutil.copy(pretrained, tmp_path / "pretrain.pt")
    result = run("pretrain.py", "--resume", tmp_path / "pretrain.last.pt", "--epochs", "3", check=False)
    assert result.returncode == 1 and error_line(result).endswith(
        "changed since the run started (added, removed or modified files, or stored at 32 px, not 16); restore them, "
        "or start a new run")


@pytest.mark.parametrize("names", [11, 9])
def test_a_checkpoint_whose_classes_do_not_fit_its_head_is_refused(pretrained, tiny_data, tmp_path, names):
    checkpoint = torch.load(pretrained, weights_only=True)
    checkpoint["classes"] = [f"class{i}" for i in range(names)]
    torch.save(checkpoint, tmp_path / "odd.pt")
    result = run("predict.py", tiny_data / "test", "--checkpoint", tmp_path / "odd.pt", "--device", "cpu",
                 check=False)
    assert f"inconsistent checkpoint: it names {names} classes ({names} different) for a head of 3 outputs" in (
        error_line(result))


def test_resuming_a_best_checkpoint_instead_of_its_resume_state_names_the_file_to_pass(pretrained):
    result = run("pretrain.py", "--resume", pretrained, check=False)
    assert error_line(result) == (f"pretrain.py: --resume {pretrained}: holds no training state; pass the .last.pt "
                                  "file beside --out")


@pytest.mark.slow
def test_resuming_a_finetune_state_with_pretrain_names_the_right_script(pretrained, tiny_data, tmp_path):
    out = tmp_path / "f.pt"
    run("finetune.py", "--checkpoint", pretrained, "--data-dir", tiny_data, "--out", out, "--epochs", "1",
        "--val-size", "6", *QUICK_NO_HIDDEN)
    result = run("pretrain.py", "--resume", out.with_suffix(".last.pt"), check=False)
    assert "the state of a finetune run; resume it with python finetune.py --resume" in error_line(result)


def one_epoch_run_restoring_signal_handlers(tiny_data, tmp_path):
    """pretrain.py in this process, its stop signals as on a terminal (a suite started with `&` ignores SIGINT); their
    handlers put back after it (a stop leaves them ignored)."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        for sig in saved:
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
        return run("pretrain.py", "--data-dir", tiny_data, "--out", tmp_path / "p.pt", "--epochs", "1", "--val-size",
                   "6", *QUICK, check=False)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_a_signal_as_the_last_epoch_ends_stops_before_the_test(tiny_data, tmp_path, monkeypatch):
    """No step is left to stop at: before, the signal was dropped, the whole test ran and the run exited 0. Its
    report is then had as after a stop during the test (a resume of the finished run)."""
    import pretrain
    end_epoch = pretrain.end_epoch

    def signalled(run, progress, *rest):  # SIGTERM arrives while the last epoch validates
        if progress.epoch + 1 == run.args.epochs:
            os.kill(os.getpid(), signal.SIGTERM)
        end_epoch(run, progress, *rest)
    monkeypatch.setattr(pretrain, "end_epoch", signalled)
    result = one_epoch_run_restoring_signal_handlers(tiny_data, tmp_path)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert error_line(result).startswith("pretrain.py: stopped by SIGTERM after the last epoch; the trained run is "
                                         "saved; its test report: python ")
    assert not (tmp_path / "p.test.json").exists() and (tmp_path / "p.last.pt").exists()


def test_a_second_signal_of_another_kind_is_said_and_ends_the_run_as_itself(tiny_data, tmp_path, monkeypatch):
    """A SIGHUP (the terminal closed) stops at the next step; a Ctrl-C while the state is saved stops at once: before,
    said as "a second SIGHUP" and exit 129, which a shell loop takes as a hang-up, not a Ctrl-C, and goes on."""
    import pretrain
    train_step, save_resume_state = pretrain.train_step, pretrain.save_resume_state

    def hung_up(*args):
        os.kill(os.getpid(), signal.SIGHUP)
        return train_step(*args)

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        save_resume_state(*args, **kwargs)
    monkeypatch.setattr(pretrain, "train_step", hung_up)
    monkeypatch.setattr(pretrain, "save_resume_state", interrupted)
    result = one_epoch_run_restoring_signal_handlers(tiny_data, tmp_path)
    assert result.returncode == 128 + signal.SIGINT, result.stderr
    assert error_line(result) == "pretrain.py: stopped at once by a second signal, SIGINT; no resume state was saved"


@pytest.mark.slow
def test_a_stop_during_the_test_leaves_a_run_whose_report_can_be_had(tmp_path):
    data = make_class_folders(tmp_path / "data", train=8, test=400, size=8)  # a test pass long enough to signal
    out = tmp_path / "p.pt"
    command = [sys.executable, str(ROOT / "pretrain.py"), "--data-dir", str(data), "--out", str(out), "--epochs",
               "1", "--val-size", "3", *QUICK]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=default_signals)
    for line in process.stderr:  # progress goes to stderr
        if line.startswith("  test: "):  # the first tenth of the test images is done
            process.send_signal(signal.SIGINT)
            break
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == stopped_status(signal.SIGINT), stderr
    assert "stopped by SIGINT during the test evaluation; the trained run is saved" in stderr.splitlines()[-1]
    assert not out.with_suffix(".test.json").exists()
    again = run("pretrain.py", "--resume", out.with_suffix(".last.pt"))
    assert "already finished 1 epochs" in again.stdout and "test: accuracy" in again.stdout
    assert load_checkpoint(out)["test_metrics"]["images"] == 1200 and out.with_suffix(".test.json").exists()


@pytest.mark.slow
def test_a_second_run_on_the_same_out_is_refused_while_the_first_holds_it(tiny_data, tmp_path):
    out = tmp_path / "p.pt"
    with pretrain.out_lock(out):  # a real lock, as a running training holds it
        result = run("pretrain.py", "--data-dir", tiny_data, "--out", out, "--epochs", "1", "--val-size", "6",
                     *QUICK, check=False)
    assert f"--out {out}: another run (pid {os.getpid()}) is writing it" in error_line(result)
    assert list(tmp_path.iterdir()) == []  # the lock is gone with its holder
    run("pretrain.py", "--data-dir", tiny_data, "--out", out, "--epochs", "1", "--val-size", "6", *QUICK)


@pytest.mark.parametrize("out, message", [
    ("folder", "is a folder; pass a file in it, e.g. --out {tmp_path}/folder/model.pt"),
    ("run.csv", "that name is for a run's resume state/log/report/pictures; pass the best-checkpoint name"),
    ("run.png", "that name is for a run's resume state/log/report/pictures"),
    ("run.test.json", "that name is for a run's resume state/log/report"),
    ("pre.last.pt", "that name is for a run's resume state/log/report"),
    pytest.param("a" * 300 + "/p.pt", "cannot reach it (File name too long); choose another --out",
                 id="too long"),  # before: an OSError's traceback
])
def test_an_out_that_would_clash_is_refused_before_training(tiny_data, tmp_path, out, message):
    (tmp_path / "folder").mkdir()
    result = run("pretrain.py", "--data-dir", tiny_data, "--out", tmp_path / out, "--epochs", "1", *QUICK,
                 check=False)
    assert message.format(tmp_path=tmp_path) in error_line(result) and "epoch" not in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


def test_finetune_onto_another_runs_resume_state_leaves_it_alone(pretrained, tiny_data, tmp_path):
    """The best checkpoint of a finetune named pre.last.pt would have replaced pre's resume state."""
    state = tmp_path / "pre.last.pt"
    state.write_bytes(b"pre's resume state")
    result = run("finetune.py", "--checkpoint", pretrained, "--out", state, "--data-dir", tiny_data,
                 "--epochs", "1", *QUICK_NO_HIDDEN, check=False)
    assert f"--out {state}: that name is for a run's resume state/log/report" in error_line(result)
    assert state.read_bytes() == b"pre's resume state" and "epoch" not in result.stdout


def test_finetune_onto_its_own_checkpoint_is_refused(pretrained, tiny_data, tmp_path):
    before = pretrained.read_bytes()
    result = run("finetune.py", "--checkpoint", pretrained, "--out", pretrained, "--data-dir", tiny_data,
                 "--epochs", "1", *QUICK_NO_HIDDEN, check=False)
    assert f"which is --checkpoint {pretrained}, the weights fine-tuning starts from" in error_line(result)
    assert pretrained.read_bytes() == before


@pytest.mark.parametrize("checkpoint, out", [("pre.last.pt", "pre.pt"), ("link.pt", "pre.pt"),
                                             ("pre.pt", "sub/../pre.pt")])
def test_finetune_never_overwrites_its_checkpoint_under_another_name(pretrained, tiny_data, tmp_path, checkpoint, out):
    """Before: --checkpoint X.last.pt --out X.pt --overwrite replaced its own source (its resume state)."""
    shutil.copy(pretrained, tmp_path / "pre.pt")
    shutil.copy(pretrained.with_suffix(".last.pt"), tmp_path / "pre.last.pt")
    (tmp_path / "link.pt").symlink_to("pre.pt")
    (tmp_path / "sub").mkdir()
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()}
    result = run("finetune.py", "--checkpoint", tmp_path / checkpoint, "--out", tmp_path / out, "--overwrite",
                 "--data-dir", tiny_data, "--epochs", "1", "--val-size", "6", *QUICK_NO_HIDDEN, check=False)
    assert f"which is --checkpoint {tmp_path / checkpoint}, the weights fine-tuning starts from" in error_line(result)
    after = {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()}
    assert after == before and "epoch" not in result.stdout


@pytest.mark.slow
def test_the_resume_a_refusal_advises_runs_as_printed(pretrained, tiny_data, tmp_path):
    """A finetune onto a pretrain run's --out advised `finetune.py --resume pretrain.last.pt`, which was refused."""
    for path in (pretrained, pretrained.with_suffix(".last.pt")):
        shutil.copy(path, tmp_path / path.name)
    result = run("finetune.py", "--checkpoint", pretrained, "--out", tmp_path / "pretrain.pt", "--data-dir", tiny_data,
                 *QUICK_NO_HIDDEN, check=False)
    advised = re.search(r"continue it with python (\S+) (--resume \S+) \(", error_line(result))
    assert advised.group(1) == "pretrain.py"
    resumed = run(advised.group(1), *advised.group(2).split())
    assert "already finished 2 epochs" in resumed.stdout
    state = torch.load(tmp_path / "pretrain.last.pt", weights_only=True)
    state["rng"]["processes"] *= 2  # the state of a torchrun run of two processes: resumed under torchrun too
    torch.save(state, tmp_path / "pretrain.last.pt")
    result = run("pretrain.py", "--out", tmp_path / "pretrain.pt", "--data-dir", tiny_data, *QUICK, check=False)
    assert (f"continue it with torchrun --nproc_per_node=2 pretrain.py --resume {tmp_path / 'pretrain.last.pt'} (a "
            in error_line(result))


@pytest.mark.slow
def test_a_finetune_resume_says_when_its_checkpoint_was_trained_on_since(pretrained, tiny_data, tmp_path):
    """`invoke all --resume --epochs 4` after pretrain trained on resumed finetune on the older weights, silently."""
    source, out = tmp_path / "pre.pt", tmp_path / "f.pt"
    shutil.copy(pretrained, source)
    run("finetune.py", "--checkpoint", source, "--data-dir", tiny_data, "--out", out, "--epochs", "1",
        "--val-size", "6", *QUICK_NO_HIDDEN)
    same = run("finetune.py", "--resume", out.with_suffix(".last.pt"), "--epochs", "2")
    assert "warning" not in same.stderr
    newer = torch.load(source, weights_only=True)
    newer["model"]["features.0.weight"] += 0.01  # trained on: other weights at another epoch
    newer["epoch"] = 4
    torch.save(newer, source)
    result = run("finetune.py", "--resume", out.with_suffix(".last.pt"), "--epochs", "3")
    assert (f"finetune.py: warning: --checkpoint {source} changed since this fine-tuning started from it (its epoch "
            f"{torch.load(pretrained, weights_only=True)['epoch']} then, epoch 4 now): the resume continues from the "
            "older weights") in result.stderr


def test_the_smallest_limit_advised_trains_with_a_validation_image_per_class(tiny_data, tmp_path):
    """--limit 4 advises --limit 6 or more for 3 classes. Before, 6 to 9 were then refused as too few for the default
    validation split of 10 %, and 10 to 19 held out one image: one class validated, a temperature fitted on it."""
    assert "pass --limit 6 or more" in error_line(run("pretrain.py", "--data-dir", tiny_data, "--limit", "4",
                                                      check=False))
    result = run("pretrain.py", "--data-dir", tiny_data, "--out", tmp_path / "p.pt", "--limit", "6", "--epochs", "1",
                 *QUICK)
    assert "pretrain: 3 training, 3 validation, 18 test images, 3 classes" in result.stdout


@pytest.mark.parametrize("flags, message", [
    (["--limit", "4"], "--limit 4: too few for 3 classes"),
    (["--limit", "49"], "train has only 48 images; pass --limit 48 or less, or leave it out to use them all"),
    (["--seed", "99999999999999999999"], "--seed: must be an integer from 0 to 4294967295"),
    (["--seed", "-1"], "--seed: must be an integer from 0 to 4294967295, got -1"),
    (["--image-size", "10000"], "--image-size: at most 1024 px"),
    (["--device", "cpu:1"], "--device cpu:1: not supported by these scripts"),
    (["--device", "mps"], "--device mps: MPS (Apple's GPU) is not available on this machine"),
    (["--device", "meta"], "--device meta: not supported by these scripts"),
    (["--device", "xla"], "--device xla: not supported by these scripts"),
    (["--val-size", "47"], "--val-size 47: leaves a class with no training image; pass --val-size 45 or less"),
    (["--val-size", "46"], "--val-size 46: leaves a class with no training image; pass --val-size 45 or less"),
    (["--out", ""], "--out '': names no file; pass the best-checkpoint name"),
    (["--label-smoothing", "5"], "--label-smoothing: must be at least 0 and below 1, got 5"),
    (["--label-smoothing", "1"], "--label-smoothing: must be at least 0 and below 1, got 1"),
    (["--lr", "1e300"], "--lr: too large: at most 3.4e+38, got 1e300"),
    (["--weight-decay", "1e39"], "--weight-decay: too large: at most 3.4e+38, got 1e39"),
    (["--momentum", "1e300"], "--momentum: must be at least 0 and below 1, got 1e300"),
    (["--momentum", "1"], "--momentum: must be at least 0 and below 1, got 1"),
    (["--momentum", "-0.5"], "--momentum: must be at least 0 and below 1, got -0.5"),
    (["--label-smoothing", "-0.1"], "--label-smoothing: must be at least 0 and below 1, got -0.1"),
    (["--warmup-epochs", "1e300"], "--warmup-epochs: too large: at most 3.4e+38, got 1e300"),
])
def test_flags_that_cannot_work_are_one_line(tiny_data, tmp_path, flags, message):
    result = run("pretrain.py", "--data-dir", tiny_data, "--out", tmp_path / "p.pt", "--epochs", "1",
                 *QUICK, *flags, check=False)
    assert message in error_line(result) and not (tmp_path / "p.pt").exists()


def test_an_out_ending_in_a_slash_names_no_file(tiny_data, tmp_path):
    """`--out runs/`: before, a checkpoint file named `runs` was written."""
    out = f"{tmp_path}/runs/"
    result = run("pretrain.py", "--data-dir", tiny_data, "--out", out, "--epochs", "1", *QUICK, check=False)
    assert error_line(result) == (f"pretrain.py: --out {out!r}: names no file; pass the best-checkpoint name, e.g. "
                                  "runs/p.pt")
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_out_of_host_memory_is_one_line(tiny_data, tmp_path):
    """A real allocation failure: the process's address space is capped below what the step needs."""
    limit = 6 * 2**30
    code = (f"import resource, sys; resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit})); "
            f"sys.argv = ['pretrain.py'] + sys.argv[1:]; sys.path.insert(0, {str(ROOT)!r}); "
            "import pretrain; pretrain.main()")
    result = subprocess.run([sys.executable, "-c", code, "--data-dir", str(tiny_data), "--out", str(tmp_path / "p.pt"),
                             "--epochs", "1", "--val-size", "6", "--device", "cpu", "--image-size", "1024",
                             "--batch-size", "42"], capture_output=True, text=True)
    if "import" in result.stderr and "Error" in result.stderr and "pretrain" not in result.stderr:
        pytest.skip(f"torch does not start under a {limit} byte address space here")
    assert "pretrain.py: out of host memory with --batch-size 42" in error_line(result)


def test_a_runtime_error_that_is_no_allocation_failure_stays_a_traceback():
    """Only torch's failed malloc is "out of host memory": another RuntimeError is a bug to see, not to misname."""
    def job():
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        cli.report_errors("pretrain.py", 8, job)


@pytest.mark.slow
def test_training_shows_its_progress_in_a_log_at_most_every_tenth(tiny_data, tmp_path):
    result = run("pretrain.py", "--data-dir", tiny_data, "--out", tmp_path / "p.pt", "--epochs", "1",
                 "--val-size", "6", *QUICK, "--batch-size", "2")  # 21 steps
    lines = [line for line in result.stderr.splitlines() if line.startswith("  epoch 1/1: ")]  # progress: stderr
    assert 5 <= len(lines) <= 10 and "\r" not in result.stderr and "  epoch 1/1: " not in result.stdout
    assert lines[0].startswith("  epoch 1/1: 6/42 images, loss ") and " img/s  eta " in lines[0]


def test_progress_on_a_terminal_is_one_line_rewritten_in_place(monkeypatch):
    parent, child = pty.openpty()
    terminal = os.fdopen(child, "w")
    monkeypatch.setattr(cli.ProgressLine, "TERMINAL_INTERVAL", 0.0)
    line = cli.ProgressLine("test", 100, stream=terminal)
    for done in range(10, 101, 10):
        if line.due(done):
            line.show(done)
    line.close()
    terminal.close()
    written = read_terminal(parent)
    assert written.count("\r") == 10 and "\n" not in written  # nine rewrites of one line, then erased
    assert "\r  test: 90/100 images  " in written and written.endswith("\r\x1b[K")


def test_progress_in_a_log_is_a_line_per_tenth():
    log = io.StringIO()
    line = cli.ProgressLine("predict", 1000, stream=log)
    for done in range(1, 1001):
        if line.due(done):
            line.show(done)
    line.close()
    assert [row.split(":")[1].split("/")[0].strip() for row in log.getvalue().splitlines()] == [
        str(100 * tenth) for tenth in range(1, 10)]


@pytest.fixture(scope="module")
def relative_run(tmp_path_factory):
    """A finished one-epoch run started in its own folder with a relative --data-dir and --out."""
    folder = tmp_path_factory.mktemp("run")
    make_class_folders(folder / "data")
    run("pretrain.py", "--data-dir", "data", "--out", "ck/p.pt", "--epochs", "1", "--val-size", "6", *QUICK,
        cwd=folder)
    yield folder
    shutil.rmtree(folder)  # its checkpoints go with the module, not at the session's end


@pytest.mark.slow
def test_a_resume_whose_best_checkpoint_is_missing_fails_before_training(relative_run):
    moved = shutil.copytree(relative_run / "ck", relative_run / "moved")  # a moved run resumes in its new place
    (moved / "p.pt").unlink()
    result = run("pretrain.py", "--resume", "moved/p.last.pt", "--epochs", "2", check=False, cwd=relative_run)
    assert error_line(result) == ("pretrain.py: --resume moved/p.last.pt: its best checkpoint moved/p.pt (epoch 1) is "
                                  "missing; put it back there, or start a new run")
    assert "epoch" not in result.stdout
    assert sorted(p.name for p in moved.iterdir()) == ["p.confusion.png", "p.csv", "p.last.pt", "p.png", "p.test.json"]


@pytest.mark.slow
def test_a_resume_from_another_folder_reads_the_runs_relative_data_dir_where_it_started(relative_run, tmp_path):
    last = os.path.relpath(relative_run / "ck" / "p.last.pt", tmp_path)
    result = run("pretrain.py", "--resume", last, "--epochs", "2", cwd=tmp_path)
    assert "epoch   2/2" in result.stdout and list(tmp_path.iterdir()) == []
    assert len(load_checkpoint(relative_run / "ck" / "p.last.pt")["history"]) == 2


@pytest.mark.slow
def test_a_run_whose_data_folder_moved_resumes_with_a_data_dir_holding_the_same_images(tiny_data, tmp_path):
    shutil.copytree(tiny_data, tmp_path / "data")
    run("pretrain.py", "--data-dir", "data", "--out", "ck/p.pt", "--epochs", "1", "--val-size", "6", *QUICK,
        cwd=tmp_path)
    (tmp_path / "data").rename(tmp_path / "moved")
    make_class_folders(tmp_path / "other", seed=1)
    result = run("pretrain.py", "--resume", "ck/p.last.pt", "--epochs", "2", "--data-dir", "other", check=False,
                 cwd=tmp_path)
    assert error_line(result) == ("pretrain.py: --resume ck/p.last.pt: the images in other/train changed since the "
                                  "run started (added, removed or modified files); restore them, or start a new run")
    result = run("pretrain.py", "--resume", "ck/p.last.pt", "--epochs", "2", "--data-dir", "moved", cwd=tmp_path)
    assert "epoch   2/2" in result.stdout
    assert load_checkpoint(tmp_path / "ck" / "p.last.pt")["args"]["data_dir"] == "moved"


@pytest.mark.slow
def test_a_resume_with_an_absolute_data_dir_works_from_another_folder(tiny_data, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    run("pretrain.py", "--data-dir", tiny_data, "--out", "ck/p.pt", "--epochs", "1", "--val-size", "6", *QUICK,
        cwd=tmp_path)
    result = run("pretrain.py", "--resume", "../ck/p.last.pt", "--epochs", "2", cwd=tmp_path / "elsewhere")
    assert "epoch   2/2" in result.stdout and list((tmp_path / "elsewhere").iterdir()) == []
    assert [row["epoch"] for row in load_checkpoint(tmp_path / "ck" / "p.last.pt")["history"]] == [1, 2]
    assert len((tmp_path / "ck" / "p.csv").read_text().splitlines()) == 3  # the header and both epochs, in one log
