import json
import os
import shutil
import stat
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import data
import predict
from conftest import QUICK, QUICK_NO_HIDDEN, ROOT, error_line, read_terminal, refuse_listing, run
from model import load_checkpoint, model_from_checkpoint
from cli import UsageError, resolve_device
from predict import classification_report, compute_logits, print_report


def odd_images(folder):
    """One image per awkward kind Pillow reads, and a corrupt one."""
    folder.mkdir()
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8))
    rgb.convert("RGBA").save(folder / "rgba.png")
    rgb.convert("LA").save(folder / "la.png")
    palette = rgb.convert("P")
    palette.save(folder / "palette.png", transparency=0)
    Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).save(folder / "grey16.png")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    rgb.convert("1").save(folder / "bits.png")
    Image.new("RGB", (1, 1), "red").save(folder / "tiny.png")
    rgb.resize((400, 30)).save(folder / "wide.bmp")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "readme.txt").write_text("not an image, not predicted")
    return 8


def test_any_image_is_predicted_and_a_bad_one_reported(pretrained, tmp_path):
    good = odd_images(tmp_path / "odd")
    result = run("predict.py", tmp_path / "odd", "--checkpoint", pretrained, "--device", "cpu", check=False)
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    assert len(lines) == good and all(line.split("\t")[1] in ("blue", "green", "red") for line in lines)
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 2
    assert "corrupt.png: cannot read this image" in errors[0]
    assert "empty.jpg: cannot read" in errors[1]


def test_predict_gives_the_evaluation_paths_logits(pretrained, tiny_data):
    checkpoint = load_checkpoint(pretrained)
    test = data.load_folder(tiny_data / "test")
    logits = compute_logits(model_from_checkpoint(checkpoint), test.images.split(256), checkpoint["image_size"])
    expected = torch.softmax(logits / checkpoint["temperature"], 1)  # fitted after training, on validation
    result = run("predict.py", tiny_data / "test", "--checkpoint", pretrained, "--device", "cpu", "--json",
                 "--topk", "3", "--batch-size", "5")
    output = json.loads(result.stdout)
    got = torch.tensor([
        [t["probability"] for t in sorted(p["top"], key=lambda t: t["label"])]
        for p in output["predictions"]
    ])
    assert torch.allclose(got, expected, atol=1e-5)
    assert [p["true"] for p in output["predictions"]] == [test.classes[i] for i in test.labels]
    report = json.loads(pretrained.with_suffix(".test.json").read_text())
    assert output["report"]["accuracy"] == pytest.approx(report["accuracy"])
    assert output["report"]["confusion_matrix"] == report["confusion_matrix"]


def test_a_checkpoints_own_eval_resize_is_the_one_predict_and_export_use(pretrained, tiny_data, tmp_path):
    """The resize before the centre crop is the checkpoint's `eval_resize` (one kept by older code than this one's
    data.EVAL_RESIZE), not data.py's; a checkpoint without one is evaluated at data.EVAL_RESIZE, as it was trained.
    Before: data.EVAL_RESIZE whatever the checkpoint said."""
    import export
    checkpoint = torch.load(pretrained, weights_only=True) | {"eval_resize": 1.0}
    torch.save(checkpoint, tmp_path / "own.pt")
    images = data.load_folder(tiny_data / "test", size=checkpoint["stored_size"]).images
    model, size = model_from_checkpoint(checkpoint).eval(), checkpoint["image_size"]
    with torch.no_grad():
        own, usual = (model(data.eval_batch(images, size, resize)) / checkpoint["temperature"]
                      for resize in (1.0, data.EVAL_RESIZE))
        assert (own - usual).abs().max() > 1e-4  # ten times the tolerance below (a barely trained model)
        classify, _ = predict.load_classifier(str(tmp_path / "own.pt"), torch.device("cpu"))
        assert torch.allclose(classify(images), own, atol=1e-5)
        assert torch.allclose(export.Deployed(checkpoint, "own.pt")(images), torch.softmax(own, 1), atol=1e-6)
        del checkpoint["eval_resize"]
        torch.save(checkpoint, tmp_path / "older.pt")
        classify, _ = predict.load_classifier(str(tmp_path / "older.pt"), torch.device("cpu"))
        assert torch.allclose(classify(images), usual, atol=1e-5)


def test_a_labelled_folder_prints_accuracy_and_a_grid(pretrained, tiny_data, tmp_path):
    grid = tmp_path / "grid.png"
    result = run("predict.py", tiny_data / "test", "--checkpoint", pretrained, "--device", "cpu", "--limit", "9",
                 "--grid", grid)
    assert "9 labelled images: accuracy" in result.stdout and "confusion matrix" in result.stdout
    assert len([line for line in result.stdout.splitlines() if "\t" in line]) == 9
    picture = Image.open(grid)
    assert picture.size == (8 * 98 + 2, 2 * 112 + 2)  # 9 tiles of 96 x (96 + 14), 8 a row, padding 2


def test_a_grid_in_new_folders_makes_them_only_when_it_is_written(pretrained, tiny_data, tmp_path):
    grid = tmp_path / "new" / "sub" / "grid.png"
    result = run("predict.py", tmp_path / "missing.png", "--checkpoint", pretrained, "--device", "cpu",
                 "--grid", grid, check=False)
    assert result.returncode == 1 and not (tmp_path / "new").exists()
    run("predict.py", tiny_data / "test" / "red", "--checkpoint", pretrained, "--device", "cpu", "--grid", grid)
    assert Image.open(grid).size[0] > 0


def test_a_grid_whose_picked_images_are_all_unreadable_is_one_line_not_a_traceback(pretrained, tiny_data, tmp_path):
    """The grid's images are picked among the files before they are read: here all of them fail, one other does not."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i in range(65):  # 64 of the 65 are picked
        (folder / f"{i:02d}.png").write_text("not an image")
    picked = set(torch.linspace(0, 64, 64).round().long().tolist())
    shutil.copy(next((tiny_data / "test" / "red").iterdir()), folder / f"{min(set(range(65)) - picked):02d}.png")
    grid = tmp_path / "grid.png"
    result = run("predict.py", folder, "--checkpoint", pretrained, "--device", "cpu", "--grid", grid, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr and not grid.exists()
    assert len(result.stdout.splitlines()) == 1
    assert f"predict.py: none of the images picked for --grid {grid} could be read" in result.stderr


@pytest.mark.parametrize("stray", ["beside.png", ".hidden/inside.png"])
def test_an_image_outside_the_class_folders_is_predicted_unlabelled(pretrained, tiny_data, tmp_path, stray):
    folder = tmp_path / "test"
    shutil.copytree(tiny_data / "test", folder)
    (folder / stray).parent.mkdir(exist_ok=True)
    shutil.copy(next((folder / "red").iterdir()), folder / stray)
    result = run("predict.py", folder, "--checkpoint", pretrained, "--device", "cpu", "--json")
    output = json.loads(result.stdout)
    truth = {p["path"]: p["true"] for p in output["predictions"]}
    hidden = stray.startswith(".")  # a hidden folder's images are skipped, as hidden files are (`.ipynb_checkpoints`)
    assert len(truth) == 19 - hidden and (str(folder / stray) in truth) is not hidden
    assert truth.get(str(folder / stray)) is None
    assert sorted(set(truth.values()) - {None}) == ["blue", "green", "red"]
    assert output["report"]["images"] == 18 and output["errors"] == []
    assert "sub-folder(s)" not in result.stderr  # a hidden folder is no sub-folder of another class to note


def test_an_extra_sub_folder_leaves_the_class_folders_labelled_and_says_so(pretrained, tiny_data, tmp_path):
    folder = tmp_path / "test"
    shutil.copytree(tiny_data / "test", folder)
    (folder / "holiday").mkdir()
    shutil.copy(next((folder / "red").iterdir()), folder / "holiday" / "x.png")
    result = run("predict.py", folder, "--checkpoint", pretrained, "--device", "cpu", "--json")
    output = json.loads(result.stdout)
    truth = {p["path"]: p["true"] for p in output["predictions"]}
    assert len(truth) == 19 and truth[str(folder / "holiday" / "x.png")] is None
    assert output["report"]["images"] == 18
    assert ("1 sub-folder(s) named like no class of the checkpoint (holiday): their images are predicted "
            "unlabelled") in result.stderr
    result = run("predict.py", tiny_data, "--checkpoint", pretrained, "--device", "cpu", "--limit", "4")
    assert result.stderr.endswith(f"predict.py: note: {tiny_data} is a data folder (train/, test/): its images are "
                                  f"predicted unlabelled; pass {tiny_data / 'test'} for the test split's accuracy\n")


def test_a_gif_in_a_folder_is_said_to_be_left_out(tmp_path, capsys):
    """predict.py names a .gif to predict it, as any file Pillow reads; a folder's are left out, not unsaid."""
    (tmp_path / "red").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "red" / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "red" / "b.gif")
    assert predict.folder_images(tmp_path, ["blue", "red"]) == [(tmp_path / "red" / "a.png", 1)]
    assert f"{tmp_path}: 1 image file(s) left out, of types not taken from folders (.gif; such as " in (
        capsys.readouterr().err)


def test_class_folders_named_but_for_case_or_unicode_normalisation_are_unlabelled_with_a_note(
        pretrained, tiny_data, tmp_path):
    """Before: predicted unlabelled without a word. Names stay exact, as ImageFolder's: a note says what to do."""
    checkpoint = torch.load(pretrained, weights_only=True)
    checkpoint["classes"] = ["blue", "caf\u00e9", "red"]
    torch.save(checkpoint, tmp_path / "c.pt")
    for folder, names in (("cased", ("BLUE", "Red")), ("decomposed", ("cafe\u0301", "red"))):
        for name in names:
            shutil.copytree(tiny_data / "test" / name.lower().replace("cafe\u0301", "green"), tmp_path / folder / name)
    result = run("predict.py", tmp_path / "cased", "--checkpoint", tmp_path / "c.pt", "--device", "cpu", "--json")
    assert all(p["true"] is None for p in json.loads(result.stdout)["predictions"])
    assert result.stderr == (f"predict.py: note: {tmp_path / 'cased'}: 2 sub-folder(s) named as a class of the "
                             "checkpoint but for case or Unicode normalisation (such as BLUE for blue): their images "
                             "are predicted unlabelled; rename them to the classes' names for the accuracy\n")
    result = run("predict.py", tmp_path / "decomposed", "--checkpoint", tmp_path / "c.pt", "--device", "cpu", "--json")
    assert json.loads(result.stdout)["report"]["images"] == 6  # red's, the only class folder named exactly
    assert result.stderr == (f"predict.py: note: {tmp_path / 'decomposed'}: 1 sub-folder(s) named as a class of the "
                             "checkpoint but for case or Unicode normalisation (such as cafe\u0301 (not NFC: "
                             "'cafe\\u0301') for caf\u00e9): their images are predicted unlabelled; rename them to the "
                             "classes' names for the accuracy\n")


def test_an_empty_path_or_grid_is_named_not_taken_for_the_current_folder_or_no_grid(pretrained, tiny_data):
    image = tiny_data / "test" / "red" / "0000.png"
    result = run("predict.py", "", image, "--checkpoint", pretrained, "--device", "cpu", check=False, cwd=tiny_data)
    assert result.returncode == 1 and len(result.stdout.splitlines()) == 1  # the one image, not the folder's 54
    assert "predict.py: '': an empty path; pass image files or folders\n" in result.stderr
    result = run("predict.py", image, "--grid", "", "--checkpoint", pretrained, "--device", "cpu", check=False)
    assert error_line(result) == ("predict.py: --grid is empty; pass a picture file, or leave the flag out for no "
                                  "picture")


def test_a_url_is_said_to_be_no_local_file(pretrained, tiny_data):
    result = run("predict.py", "https://example.com/cat.png", tiny_data / "test" / "red" / "0000.png",
                 "--checkpoint", pretrained, "--device", "cpu", check=False)
    assert result.returncode == 1 and result.stdout.startswith(str(tiny_data / "test" / "red" / "0000.png"))
    assert ("https://example.com/cat.png: a URL; predict.py reads local files: download it first "
            "(e.g. curl -O https://example.com/cat.png)") in result.stderr


def test_a_very_long_narrow_image_is_refused_alone(pretrained, tiny_data, tmp_path):
    Image.new("RGB", (2_000_000, 1), "white").save(tmp_path / "wide.png")  # resized to 32 px high: 6 GB
    image = tiny_data / "test" / "red" / "0000.png"
    result = run("predict.py", tmp_path / "wide.png", image, "--checkpoint", pretrained, "--device", "cpu",
                 check=False)
    assert result.returncode == 1 and result.stdout.startswith(f"{image}\t")
    assert result.stderr.endswith(f"predict.py: {tmp_path / 'wide.png'}: 2000000 x 1 px, its longer side over 100 "
                                  "times its shorter: too narrow to take a square from; crop it, or remove the file\n")


def test_topk_lines(pretrained, tiny_data):
    image = next((tiny_data / "test" / "red").iterdir())
    result = run("predict.py", image, "--checkpoint", pretrained, "--device", "cpu", "--topk", "5")
    fields = result.stdout.strip().split("\t")
    assert fields[0] == str(image) and len(fields) == 1 + 2 * 3  # top-5 of 3 classes is all 3
    assert sum(float(p) for p in fields[2::2]) == pytest.approx(1, abs=1e-3)


def test_no_checkpoint_says_train_first(tmp_path, tiny_data):
    result = run("predict.py", tiny_data / "test", cwd=tmp_path, check=False)
    assert result.returncode == 1 and "train first" in result.stderr and result.stderr.count("\n") == 1
    assert "checkpoints/pretrain.pt exists under the current folder; " in result.stderr  # where its paths are


@pytest.mark.parametrize("newest", ["pretrain.pt", "finetune.pt", None])  # None: both as new, finetune.pt taken
def test_without_checkpoint_the_newest_default_is_taken_and_named_on_stderr(pretrained, tiny_data, tmp_path, newest):
    """Before: finetune.pt was taken even when pretrain.pt had been trained again since, and nothing said which."""
    image = next((tiny_data / "test" / "red").iterdir())
    (tmp_path / "checkpoints").mkdir()
    for age, name in enumerate(sorted(["pretrain.pt", "finetune.pt"], key=lambda name: name == newest)):
        shutil.copy(pretrained, tmp_path / "checkpoints" / name)
        os.utime(tmp_path / "checkpoints" / name, (1000 * (age + 1 if newest else 1),) * 2)
    result = run("predict.py", image, "--device", "cpu", cwd=tmp_path)
    taken = newest or "finetune.pt"
    assert result.stderr.splitlines()[0] == (f"predict.py: checkpoint checkpoints/{taken} (no --checkpoint given: the "
                                             "newer of checkpoints/finetune.pt and checkpoints/pretrain.pt (the first "
                                             "if both are as new))")
    assert result.stdout.startswith(f"{image}\t") and "checkpoint" not in result.stdout
    if newest == "pretrain.pt":  # export.py takes the same one (before: finetune.pt, the older)
        result = run("export.py", "--out", tmp_path / "m.pt2", "--limit", "2", cwd=tmp_path)
        assert result.stderr.startswith("export.py: checkpoint checkpoints/pretrain.pt (no --checkpoint given: ")


@pytest.mark.parametrize("script", ["predict.py", "export.py"])
def test_a_runs_resume_state_is_refused_naming_its_checkpoint(pretrained, tiny_data, tmp_path, script):
    """Before: predicted and exported with the last epoch's weights, not the best validation epoch's, uncalibrated."""
    state = pretrained.with_suffix(".last.pt")
    result = run(script, "--checkpoint", state, *{"predict.py": [tiny_data / "test"],
                                                  "export.py": ["--out", tmp_path / "m.pt2"]}[script], check=False)
    assert error_line(result) == (f"{script}: {state}: a run's resume state, its last epoch's weights (not the best "
                                  "validation epoch's, nor calibrated or averaged); pass the run's checkpoint, "
                                  f"{pretrained}")
    assert result.stdout == "" and list(tmp_path.iterdir()) == []


@pytest.mark.slow  # a process: its stdout and stderr are one terminal
def test_on_a_terminal_no_result_line_follows_the_progress_line(pretrained, tiny_data):
    """Before: a batch's first line was printed after the progress line's text (`\\r  predict: 12/300 images ...
    eta 00:00:15\\x1b[K../many/0012.png ...`), the progress on stderr and the results on stdout sharing the line."""
    parent, child = pytest.importorskip("pty").openpty()  # POSIX's
    every_batch = ("import sys; sys.path.insert(0, sys.argv[1]); import cli, runpy; "
                   "cli.ProgressLine.TERMINAL_INTERVAL = 0; sys.argv = sys.argv[2:]; "
                   "runpy.run_path(sys.argv[0], run_name='__main__')")
    process = subprocess.Popen([sys.executable, "-c", every_batch, str(ROOT), str(ROOT / "predict.py"),
                                tiny_data / "test", "--checkpoint", pretrained, "--device", "cpu", "--batch-size", "4"],
                               stdout=child, stderr=child)
    os.close(child)
    written = read_terminal(parent)
    assert process.wait() == 0
    results = [line for line in written.replace("\r\n", "\n").split("\n") if str(tiny_data) in line]
    assert len(results) == 18 and "  predict: 16/18 images" in written
    # as the terminal shows each line: from its last carriage return on, the erasures (\x1b[K) invisible
    assert all(line.rsplit("\r", 1)[-1].replace("\x1b[K", "").startswith(str(tiny_data)) for line in results)


def test_paths_may_come_between_and_after_the_flags(pretrained, tiny_data, tmp_path):
    """Before: `a.png --topk 2 b.png` was "unrecognized arguments: b.png", also as `invoke predict --paths b.png --
    a.png --topk 2` runs it."""
    first, second = sorted((tiny_data / "test" / "red").iterdir())[:2]
    shutil.copy(second, tmp_path / "-dash.png")
    for argv in ([first, "--topk", "2", second, "--", tmp_path / "-dash.png"],
                 [first, "--topk", "2", "--", second, tmp_path / "-dash.png"]):
        result = run("predict.py", "--checkpoint", pretrained, "--device", "cpu", *argv)
        assert [line.split("\t")[0] for line in result.stdout.splitlines()] == [str(first), str(second),
                                                                                str(tmp_path / "-dash.png")]
    result = run("predict.py", first, "--topk", "2", "--bogus", second, "--checkpoint", pretrained, check=False)
    assert result.returncode == 2 and result.stderr.endswith("error: unrecognized arguments: --bogus\n")


def test_a_wildcard_no_shell_expanded_is_expanded(pretrained, tiny_data, tmp_path):
    """cmd.exe and PowerShell pass `*.png` on as typed (before: "no such file or folder" on Windows). Their [ is a
    letter; a URL's ? is no wildcard."""
    shutil.copytree(tiny_data / "test" / "red", tmp_path / "[red]")
    shutil.copy(tmp_path / "[red]" / "0001.png", tmp_path / "photo1.png")
    url = "https://example.com/cat.png?raw=true"
    result = run("predict.py", tmp_path / "[red]" / "000?.png", tmp_path / "*" / "9*.png", tmp_path / "photo[1].png",
                 url, "--checkpoint", pretrained, "--device", "cpu", check=False)
    assert [line.split("\t")[0] for line in result.stdout.splitlines()] == [str(tmp_path / "[red]" / f"000{i}.png")
                                                                            for i in range(6)]
    assert result.stderr.splitlines()[:3] == [
        f"predict.py: {tmp_path / '*' / '9*.png'}: no file matches this wildcard; check the pattern",
        f"predict.py: {tmp_path / 'photo[1].png'}: no such file or folder; check the path",
        f"predict.py: {url}: a URL; predict.py reads local files: download it first (e.g. curl -O {url})"]


def test_missing_path_and_empty_folder(pretrained, tmp_path):
    (tmp_path / "empty").mkdir()
    result = run("predict.py", tmp_path / "nope.png", tmp_path / "empty", "--checkpoint", pretrained,
                 "--device", "cpu", check=False)
    assert result.returncode == 1
    assert "nope.png: no such file or folder; check the path\n" in result.stderr
    assert "empty: no images in this folder" in result.stderr


def test_corrupt_checkpoint(tmp_path, tiny_data):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    result = run("predict.py", tiny_data / "test", "--checkpoint", tmp_path / "bad.pt", check=False)
    assert result.returncode == 1
    assert "bad.pt: not a checkpoint file (not a PyTorch zip archive, or damaged)" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name, available, count, message", [
    ("gpu", True, 1, "--device gpu: not a device name; use auto, cuda, cuda:N, mps or cpu"),
    ("cuda", False, 0, "--device cuda: CUDA is not available on this machine; use --device auto or cpu"),
    ("cuda:1", False, 0, "--device cuda:1: CUDA is not available on this machine; use --device auto or cpu"),
    ("cuda:2", True, 2, "--device cuda:2: this machine has 2 CUDA device(s), numbered from 0; pass one of them"),
    ("mps", False, 0, "--device mps: MPS (Apple's GPU) is not available on this machine; use --device auto or cpu"),
])
def test_a_device_this_machine_lacks_is_a_usage_error(monkeypatch, name, available, count, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UsageError) as error:
        resolve_device(name)
    assert str(error.value) == message


def test_a_device_the_machine_has_is_used(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("cuda:1") == torch.device("cuda", 1) and resolve_device("cpu:0") == torch.device("cpu")
    assert resolve_device("mps:0") == torch.device("mps")


def test_device_cpu_asks_nothing_of_cuda(monkeypatch, capsys):
    """Asking starts CUDA's driver (time), and a broken one warns on stderr: --device cpu is there to avoid both."""
    def broken_driver():
        warnings.warn("CUDA initialization: The NVIDIA driver on your system is too old")
        return False

    monkeypatch.setattr(torch.cuda, "is_available", broken_driver)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_device("cpu") == torch.device("cpu")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("cuda, mps, chosen", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_device_auto_takes_cuda_then_mps_then_the_cpu_with_a_warning(monkeypatch, capsys, cuda, mps, chosen):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert resolve_device("auto") == torch.device(chosen)
    assert ("running on the CPU (slow); pass --device cpu" in capsys.readouterr().err) is (chosen == "cpu")


@pytest.mark.parametrize("script", ["predict.py", "pretrain.py"])
def test_an_output_path_that_is_a_fifo_is_refused_before_any_work(pretrained, tiny_data, tmp_path, script):
    """The write-then-rename would replace the FIFO (as root: a device such as /dev/null) with a regular file."""
    fifo = tmp_path / ("out.png" if script == "predict.py" else "out.pt")  # a .png --out is a run's picture's name
    os.mkfifo(fifo)
    if script == "predict.py":
        result = run(script, tiny_data / "test", "--checkpoint", pretrained, "--device", "cpu", "--grid", fifo,
                     check=False)
        flag, what = "--grid", "a picture file"
    else:
        result = run(script, "--data-dir", tiny_data, "--out", fifo, *QUICK, check=False)
        flag, what = "--out", "a file"
    assert error_line(result).endswith(f"{flag} {fifo}: is a FIFO, not a regular file, and writing would replace "
                                       f"it; pass {what} path, e.g. {flag} {tmp_path}/"
                                       + ("predictions.png" if flag == "--grid" else "model.pt"))
    assert result.stdout == "" and stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_a_grid_onto_a_full_disk_is_one_line_and_leaves_no_temporary_file(pretrained, tiny_data, small_filesystem):
    full = small_filesystem(size="64k")  # the grid of the 18 test images is a PNG of about 3 times that
    grid = full / "grid.png"
    result = run("predict.py", tiny_data / "test", "--checkpoint", pretrained, "--device", "cpu", "--grid", grid,
                 check=False)
    assert error_line(result) == (f"predict.py: --grid {grid}: cannot write (No space left on device); free space "
                                  "or choose another path")
    assert list(full.iterdir()) == []


def test_a_grid_naming_an_image_to_predict_is_refused_before_predicting(pretrained, tiny_data, tmp_path):
    shutil.copytree(tiny_data / "test", tmp_path / "test")
    image = tmp_path / "test" / "red" / "0000.png"
    before = image.read_bytes()
    result = run("predict.py", tmp_path / "test", "--checkpoint", pretrained, "--device", "cpu",
                 "--grid", tmp_path / "test" / "green" / ".." / "red" / "0000.png", check=False)
    assert error_line(result).endswith("0000.png: is one of the images to predict, and writing the picture would "
                                       "overwrite it; choose another path")
    assert result.stdout == "" and image.read_bytes() == before


@pytest.mark.parametrize("checkpoint, message", [
    ("", "--checkpoint is empty; pass a checkpoint file, or leave the flag out to use the newer of "
         "checkpoints/finetune.pt and checkpoints/pretrain.pt (the first if both are as new)"),
    ("{tmp_path}", "{tmp_path}: is a folder; pass a checkpoint file, e.g. {tmp_path}/pretrain.pt"),
])
def test_an_empty_or_folder_checkpoint_is_named(tiny_data, tmp_path, checkpoint, message):
    """'' fell back to the default checkpoints without a word; a folder was "no such checkpoint file"."""
    result = run("predict.py", tiny_data / "test", "--checkpoint", checkpoint.format(tmp_path=tmp_path),
                 "--device", "cpu", check=False)
    assert error_line(result) == "predict.py: " + message.format(tmp_path=tmp_path)


def test_a_class_without_images_has_no_accuracy_rather_than_zero(capsys):
    classes = ["red", "green", "blue"]
    logits = torch.tensor([[2.0, 0, 0], [0, 2.0, 0], [2.0, 0, 0]])
    report = classification_report(logits, torch.tensor([0, 1, 1]), classes)
    assert report["per_class_accuracy"] == {"red": 1.0, "green": 0.5, "blue": None}
    assert '"blue": null' in json.dumps(report)
    print_report("3 labelled images", report, classes)
    lines = capsys.readouterr().out.splitlines()
    assert lines[2:6] == ["         red   100.00%     50.00%     66.67%",
                          "       green    50.00%    100.00%     66.67%",
                          "        blue       n/a        n/a        n/a",
                          "  macro mean    75.00%     75.00%     66.67%"]


def test_a_confusion_matrix_wider_than_a_terminal_is_printed_as_its_most_confused_pairs(capsys):
    classes = [f"class{i:03d}" for i in range(105)]
    labels = torch.arange(105).repeat(3)
    logits = torch.nn.functional.one_hot(labels, 105).float()
    logits[0, 7] = logits[105, 7] = 2.0  # class000 taken for class007 twice
    logits[50, 9] = 2.0  # class050 once for class009
    report = classification_report(logits, labels, classes)
    print_report("test", report, classes)
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 120 and "confusion matrix (rows" not in out
    assert out.endswith("most confused pairs (2 of 2; the full matrix is in the JSON report: predict.py --json, "
                        "a training run's .test.json):\n  class000 taken for class007: 2\n"
                        "  class050 taken for class009: 1\n")
    assert len(report["confusion_matrix"]) == 105 and report["confusion_matrix"][0][7] == 2


def test_an_unreadable_folder_is_its_own_error_line_and_the_rest_predicted(pretrained, tiny_data, tmp_path,
                                                                           monkeypatch):
    """Before: a PermissionError traceback."""
    locked, image = tmp_path / "locked", tiny_data / "test" / "red" / "0000.png"
    locked.mkdir()
    refuse_listing(monkeypatch, locked)
    result = run("predict.py", locked, image, "--checkpoint", pretrained, "--device", "cpu", check=False)
    assert result.returncode == 1 and result.stdout.startswith(str(image)) and "Traceback" not in result.stderr
    assert f"{locked}: cannot read this folder (Permission denied); check its permissions" in result.stderr


def test_an_image_named_twice_is_predicted_and_counted_once(pretrained, tiny_data):
    test = tiny_data / "test"
    count = len(list(test.rglob("*.png")))
    one = sorted(test.rglob("*.png"))[0]
    # `..` is kept by Path (`/./` is not): only a resolved path tells these names of one image apart from others
    result = run("predict.py", one, test, f"{test}/./", f"{test}/../test", "--json", "--checkpoint", pretrained,
                 "--device", "cpu")
    report = json.loads(result.stdout)
    paths = [p["path"] for p in report["predictions"]]
    assert len(paths) == count and paths[0] == str(one)
    assert report["predictions"][0]["true"] == one.parent.name  # the folder's label reaches the first name
    assert sum(map(sum, report["report"]["confusion_matrix"])) == count
    assert f"{2 * count + 1} image(s) named more than once" in result.stderr


@pytest.mark.parametrize("script, flag", [("predict.py", "--grid"), ("pretrain.py", "--out"), ("finetune.py", "--out")])
def test_a_tilde_the_shell_left_unexpanded_makes_no_folder_named_tilde(pretrained, tiny_data, tmp_path, script, flag):
    name = "~/grid.png" if flag == "--grid" else "~/model.pt"
    args = {"predict.py": [tiny_data / "test", "--checkpoint", pretrained],
            "pretrain.py": ["--data-dir", tiny_data, *QUICK],
            "finetune.py": ["--data-dir", tiny_data, "--checkpoint", pretrained, *QUICK_NO_HIDDEN]}[script]
    result = run(script, *args, f"{flag}={name}", check=False, cwd=tmp_path)  # bash leaves `--grid=~/...` as is
    assert error_line(result) == (f"{script}: {flag} {name}: starts with a ~ the shell did not expand (it would make "
                                  f"a folder named ~ here); write {flag} {name} with a space after {flag}, or $HOME "
                                  "for ~")
    assert not (tmp_path / "~").exists()  # before: ~/grid.png made here, "wrote ~/grid.png" read as the home folder
    (tmp_path / "~").mkdir()  # a folder really named ~ is the user's to write in
    assert not error_line(run(script, *args, f"{flag}={name}", "--device", "bogus", check=False,
                              cwd=tmp_path)).endswith("or $HOME for ~")


@pytest.mark.parametrize("script, flag", [("predict.py", "--grid"), ("pretrain.py", "--out")])
def test_an_output_under_a_file_names_the_file(pretrained, tiny_data, tmp_path, script, flag):
    (tmp_path / "notes").write_text("mine")
    name = tmp_path / "notes" / "sub" / ("grid.png" if flag == "--grid" else "model.pt")
    args = [tiny_data / "test", "--checkpoint", pretrained] if script == "predict.py" else ["--data-dir", tiny_data]
    result = run(script, *args, flag, name, *QUICK[-2:], check=False)
    # before: "cannot write in .../notes/sub (File exists)" from mkdir, or "(Not a directory)"
    assert error_line(result) == (f"{script}: {flag} {name}: {tmp_path / 'notes'} is a file, not a folder; "
                                  f"choose another {flag}")
    assert (tmp_path / "notes").read_text() == "mine"


@pytest.mark.parametrize("fonts", [["DejaVuSans.ttf"], ["NotoSans-Regular.ttf", "DejaVuSans.ttf"], []],
                         ids=["one", "two", "none"])  # two: the first in WIDE_FONTS' order draws
def test_class_names_are_drawn_with_a_font_that_has_their_letters_or_said_to_be_boxes(tmp_path, monkeypatch, capsys,
                                                                                      fonts):
    """Before: Cyrillic, CJK, even accented class names were drawn as boxes in --grid, without a word."""
    import predict
    found = list(tmp_path.parent.joinpath("/usr/share/fonts").rglob("DejaVuSans.ttf"))
    if fonts and not found:
        pytest.skip("no DejaVuSans.ttf on this machine")
    (tmp_path / "fonts").mkdir()
    for name in fonts:  # DejaVu Sans under each name: every font here has the letters
        shutil.copy(found[0], tmp_path / "fonts" / name)
    monkeypatch.setattr(predict, "FONT_FOLDERS", (str(tmp_path / "fonts"),))
    for cached in (predict.wide_fonts, predict.font_for, predict.warn_boxes):
        cached.cache_clear()
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    predict.draw_grid(str(tmp_path / "grid.png"), images, ["снег", "café"], [None, "café"])
    assert Image.open(tmp_path / "grid.png").size[0] > 0
    warning = capsys.readouterr().err
    if fonts:
        assert warning == "" and predict.font(11, ["снег café"]).path == str(tmp_path / "fonts" / fonts[0])
    else:
        assert warning == ("warning: no font found here draws the letters éгенс of the class names (looked for "
                           "NotoSansCJK-Regular.ttc and others in the usual font folders): they are drawn as boxes\n")


def test_the_font_folders_are_walked_only_for_a_letter_pillows_font_lacks(tmp_path, monkeypatch):
    """Before: every process that drew a picture walked the machine's font folders (thousands of files on a Mac)."""
    import predict
    monkeypatch.setattr(predict, "wide_fonts", lambda: pytest.fail("font folders walked for ASCII class names"))
    predict.font_for.cache_clear()
    predict.draw_grid(str(tmp_path / "grid.png"), torch.zeros(2, 3, 32, 32, dtype=torch.uint8), ["cat", "Truck 2"],
                      [None, "cat"])
    assert Image.open(tmp_path / "grid.png").size[0] > 0
    predict.font_for.cache_clear()


def test_without_a_font_for_every_letter_the_one_lacking_fewest_draws_the_names(tmp_path, monkeypatch, capsys):
    """Before: Pillow's own font, the Hebrew that DejaVu Sans has drawn as boxes beside the CJK letter none had."""
    import predict
    found = list(tmp_path.joinpath("/usr/share/fonts").rglob("DejaVuSans.ttf"))
    if not found:
        pytest.skip("no DejaVuSans.ttf on this machine")
    monkeypatch.setattr(predict, "FONT_FOLDERS", (str(found[0].parent),))
    monkeypatch.setattr(predict, "WIDE_FONTS", ("DejaVuSans.ttf",))
    for cached in (predict.wide_fonts, predict.font_for, predict.warn_boxes):
        cached.cache_clear()
    assert predict.font(11, ["שלום", "猫"]).path == str(found[0])
    assert "draws the letters 猫 of the class names" in capsys.readouterr().err
    for name in ("first.ttf", "second.ttf"):  # two fonts lacking as many letters: the first in WIDE_FONTS' order
        shutil.copy(found[0], tmp_path / name)
    monkeypatch.setattr(predict, "FONT_FOLDERS", (str(tmp_path),))
    monkeypatch.setattr(predict, "WIDE_FONTS", ("first.ttf", "second.ttf"))
    for cached in (predict.wide_fonts, predict.font_for, predict.warn_boxes):
        cached.cache_clear()
    assert predict.font(11, ["שלום", "猫"]).path == str(tmp_path / "first.ttf")


def test_accuracy_is_the_exact_share_not_a_float32_rounding():
    """Before: 7 right of 40 was reported as 0.17499999701976776 (a float32 division), and 0.1825 of a validation
    split as 0.18250000476837158 in the log; the per-class accuracies, shares of Python ints, were exact."""
    labels = torch.tensor([0] * 20 + [1] * 20)
    logits = torch.zeros(40, 2)
    logits[:7, 0] = 1.0  # 7 of class 0 right, the rest predicted 0's opposite
    logits[7:20, 1] = 1.0
    logits[20:, 0] = 1.0
    report = classification_report(logits, labels, ["a", "b"])
    assert report["accuracy"] == 7 / 40 and json.dumps(report["accuracy"]) == "0.175"
