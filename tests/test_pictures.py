"""Issue 27: the pictures a run and predict.py draw, calibrated probabilities, --min-confidence and --mistakes."""
import argparse
import collections
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import predict
import pretrain
from conftest import QUICK, error_line, run
from model import CheckpointError, load_checkpoint, model_from_checkpoint


def pixels_of(picture: Image.Image, colour: tuple) -> np.ndarray:
    """(row, column) of every pixel of exactly this colour."""
    return np.argwhere((np.asarray(picture.convert("RGB")) == colour).all(2))


def history(epochs: int) -> list[dict]:
    return [{"epoch": e, "train_loss": 2.0 / e, "train_acc": 0.2 * e, "val_loss": 2.2 / e, "val_acc": 0.15 * e,
             "lr": 0.01} for e in range(1, epochs + 1)]


def test_learning_curves_show_training_validation_and_the_kept_epoch_where_it_was():
    picture = predict.learning_curves(history(4), 3, "pretrain: run, 4 of 4 epochs")
    assert picture.size == (1080, 340)
    kept = pixels_of(picture, predict.CURVE_COLOURS["kept"])
    train = pixels_of(picture, predict.CURVE_COLOURS["train"])
    validation = pixels_of(picture, predict.CURVE_COLOURS["validation"])
    assert len(train) > 200 and len(validation) > 200
    # the kept line in each of the three panels lies three quarters of the way from epoch 0.5 to 4.5 (the legend's
    # swatch is above the panels)
    columns = sorted(set(kept[kept[:, 0] > 84][:, 1]))
    for panel in range(3):
        left, right = panel * 360 + 70, (panel + 1) * 360 - 16
        expected = left + (3 - 0.5) / 4 * (right - left)
        assert any(abs(column - expected) <= 1.5 for column in columns), (panel, columns)
    # the loss falls: the training curve's pixels at the left of the loss panel lie higher (smaller rows)
    in_loss = train[(train[:, 1] < 344) & (train[:, 0] > 84)]
    assert in_loss[in_loss[:, 1] < 120][:, 0].mean() < in_loss[in_loss[:, 1] > 300][:, 0].mean()


def test_learning_curves_draw_a_fine_tunes_epoch_0_validation_alone():
    """A fine-tune's starting weights validated as epoch 0: its row has no training columns; the validation curves
    start at epoch 0 (at a quarter of the panel from epoch -0.5 to 1.5), the training curve at epoch 1; the kept
    line, epoch 0, there too."""
    start = {"epoch": 0, "val_loss": 3.0, "val_acc": 0.1}
    picture = predict.learning_curves([start, *history(1)], 0, "finetune: run, 1 of 1 epochs")
    train, validation = (pixels_of(picture, predict.CURVE_COLOURS[kind]) for kind in ("train", "validation"))
    train, validation = (found[found[:, 0] > 84][:, 1] for found in (train, validation))  # below the legend
    left, right = 70, 360 - 16  # the loss panel
    at = [left + (epoch + 0.5) / 2 * (right - left) for epoch in (0, 1)]
    assert any(abs(column - at[0]) <= 3 for column in validation) and any(abs(c - at[1]) <= 3 for c in validation)
    assert not any(abs(column - at[0]) <= 3 for column in train) and any(abs(c - at[1]) <= 3 for c in train)
    kept = pixels_of(picture, predict.CURVE_COLOURS["kept"])
    assert any(abs(column - at[0]) <= 3 for column in kept[kept[:, 0] > 84][:, 1])


@pytest.mark.parametrize("n", [10, 100])
def test_a_right_models_confusion_picture_is_darkest_on_the_diagonal(n):
    classes = [f"class {i}" for i in range(n)]
    confusion = np.eye(n, dtype=int) * 50 + np.random.default_rng(0).integers(0, 3, (n, n))
    picture = predict.confusion_picture(confusion.tolist(), classes, "test")
    cell = max(9, min(56, 900 // n))
    assert max(picture.size) <= 1200 and picture.width > n * cell
    left = picture.width - 90 - n * cell  # the grid ends 90 px before the right edge (the shade scale)
    # each cell's shade, 2 px in from its corner (a count is written in its middle)
    shades = np.asarray(picture.convert("RGB")).astype(int)[40 + 2::cell, left + 2::cell][:n, :n].sum(2)
    assert (shades.argmin(1) == np.arange(n)).all()  # each row's darkest cell is its diagonal one
    diagonal = np.eye(n, dtype=bool)
    assert shades[diagonal].max() < shades[~diagonal].min() - 100


def test_a_long_class_name_is_cut_beside_the_confusion_matrix_not_widening_it(monkeypatch):
    """Before: a class folder named with 200 letters made a 1885 x 1835 px picture, the matrix in its corner."""
    long, drawn, text = "x" * 200, [], ImageDraw.ImageDraw.text
    monkeypatch.setattr(ImageDraw.ImageDraw, "text", lambda self, xy, words, *args, **kwargs: drawn.append(words) or (
        text(self, xy, words, *args, **kwargs)))
    picture = predict.confusion_picture([[3, 1, 0], [2, 4, 0], [0, 0, 1]], ["a", long, "b"], "test")
    assert max(picture.size) < 600
    labels = [words for words in drawn if words.startswith("xx")]  # its row's and column's (not a font's probe, "x")
    assert len(labels) == 2 and all(label.endswith("…") for label in labels)


def test_a_title_wider_than_its_picture_widens_it(tmp_path):
    """Before: a confusion matrix of few classes cut its title (and the accuracy in it) at both edges; the tiles of
    --mistakes, fewer than four, lay at the left of a title centred on 420 px."""
    title = "pretrain: p1, the test split (47.6% right; shade: share of the true class's images)"
    picture = np.asarray(predict.confusion_picture([[3, 1], [2, 4]], ["a", "b"], title).convert("L"))
    inked = np.nonzero((picture[:30] < 128).any(0))[0]  # the columns the title's letters reach
    assert inked.size and inked.min() > 2 and inked.max() < picture.shape[1] - 3
    red = torch.zeros(3, 8, 8, dtype=torch.uint8)
    red[0] = 255
    done = predict.Predicted(labels=[0, 1], mistakes=[(0.9, 0, red)])  # one mistake: a tile far narrower than its title
    args = argparse.Namespace(grid=None, mistakes=str(tmp_path / "m.png"), json=True, min_confidence=0.0)
    predict.draw_predicted_pictures(args, done, [{"path": "a.png", "predicted": "b", "true": "a", "probability": 0.9}])
    drawn = Image.open(tmp_path / "m.png")
    columns = pixels_of(drawn, (255, 0, 0))[:, 1]  # the tile's red image
    assert drawn.width > 200 and abs(columns.min() - (drawn.width - 1 - columns.max())) <= 2  # centred under it


def test_temperature_lowers_the_nll_of_an_over_confident_model():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (2000,), generator=generator)
    right = torch.rand(2000, generator=generator) < 0.6
    predicted = torch.where(right, labels, (labels + 1) % 10)
    logits = 12 * F.one_hot(predicted, 10).float() + torch.randn(2000, 10, generator=generator)  # ~100 % sure
    temperature = predict.fit_temperature(logits, labels)
    grid = torch.linspace(0.5, 30, 1000)  # every temperature's NLL at once: 1000 small steps take seconds on 2 cores
    nll = F.cross_entropy((logits / grid[:, None, None]).flatten(0, 1), labels.repeat(len(grid)), reduction="none")
    best = grid[nll.view(len(grid), -1).mean(1).argmin()].item()
    assert temperature > 2 and temperature == pytest.approx(best, rel=0.02)
    assert F.cross_entropy(logits / temperature, labels) < F.cross_entropy(logits, labels) - 1
    report = predict.calibration_report(logits, labels, temperature)
    assert report["ece"] == pytest.approx(0.4, abs=0.02)  # sure of all, right of 60 %
    assert report["ece_calibrated"] < report["ece"] / 4


def test_expected_calibration_error_on_a_hand_made_case():
    probabilities = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.6, 0.4]])
    labels = torch.tensor([0, 1, 1, 0])
    # bin (0.867, 0.933]: two at 0.9, one right: |0.5 - 0.9| x 2/4; bin (0.533, 0.6]: two at 0.6, both right:
    # |1 - 0.6| x 2/4
    assert predict.expected_calibration_error(probabilities, labels) == pytest.approx(0.4)
    assert predict.expected_calibration_error(torch.tensor([[0.5, 0.5], [0.5, 0.5]]), torch.tensor([0, 1])) == \
        pytest.approx(0.0)  # 50 % sure, right half the time


def test_precision_recall_and_f1_with_their_macro_means():
    logits = torch.tensor([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [2.0, 0, 0, 0], [0, 0, 2.0, 0], [0, 0, 2.0, 0]])
    report = predict.classification_report(logits, torch.tensor([0, 1, 1, 2, 3]), ["a", "b", "c", "d"])
    assert report["per_class_precision"] == {"a": 0.5, "b": 1.0, "c": 0.5, "d": None}  # d: never predicted
    assert report["per_class_accuracy"] == {"a": 1.0, "b": 0.5, "c": 1.0, "d": 0.0}
    assert report["per_class_f1"] == pytest.approx({"a": 2 / 3, "b": 2 / 3, "c": 2 / 3, "d": 0.0})
    assert report["macro_precision"] == pytest.approx(2 / 4)  # d counts 0
    assert report["macro_recall"] == pytest.approx(2.5 / 4) and report["macro_f1"] == pytest.approx(2 / 4)
    # c predicted once, for a b, and no image of c: in the means, with 0 (scikit-learn's labels: true or predicted)
    report = predict.classification_report(logits[[0, 3, 1]], torch.tensor([0, 1, 1]), ["a", "b", "c", "d"])
    assert report["per_class_precision"] == {"a": 1.0, "b": 1.0, "c": 0.0, "d": None}
    assert report["macro_precision"] == pytest.approx(2 / 3) and report["macro_recall"] == pytest.approx(1.5 / 3)
    assert report["macro_f1"] == pytest.approx((1 + 2 / 3) / 3)


def test_a_run_draws_its_curves_and_its_confusion_matrix_and_keeps_a_temperature(pretrained):
    curves = Image.open(pretrained.with_suffix(".png"))
    confusion = Image.open(pretrained.with_name("pretrain.confusion.png"))
    assert curves.size == (1080, 340) and curves.format == "PNG"
    assert len(pixels_of(curves, predict.CURVE_COLOURS["validation"])) > 100
    assert confusion.format == "PNG" and confusion.size[0] > 3 * 56 and confusion.size[1] > 3 * 56
    report = json.loads(pretrained.with_suffix(".test.json").read_text())
    checkpoint = load_checkpoint(pretrained)
    assert checkpoint["temperature"] == report["temperature"] > 0
    assert 0 <= report["ece"] <= 1 and 0 <= report["ece_calibrated"] <= 1
    assert set(report["per_class_f1"]) == {"blue", "green", "red"} and "macro_f1" in report


def test_predict_without_a_temperature_in_the_checkpoint_uses_1(pretrained, tiny_data, tmp_path):
    checkpoint = load_checkpoint(pretrained)
    del checkpoint["temperature"]
    torch.save(checkpoint, tmp_path / "old.pt")
    image = tiny_data / "test" / "red" / "0000.png"
    images = predict.read_images([(image, 0)], checkpoint["stored_size"], [])[0]
    logits = predict.compute_logits(model_from_checkpoint(checkpoint), [images], checkpoint["image_size"])
    result = run("predict.py", image, "--checkpoint", tmp_path / "old.pt", "--device", "cpu", "--json", "--topk", "3")
    top = json.loads(result.stdout)["predictions"][0]["top"]
    expected = torch.softmax(logits[0], 0)
    assert [t["probability"] for t in top] == pytest.approx(sorted(expected.tolist(), reverse=True), abs=1e-6)


@pytest.mark.parametrize("threshold", ["1.0", "0"])
def test_min_confidence_1_makes_every_image_unknown_and_0_none(pretrained, tiny_data, threshold):
    plain = run("predict.py", tiny_data / "test", "--checkpoint", pretrained, "--device", "cpu",
                "--min-confidence", threshold)
    as_json = json.loads(run("predict.py", tiny_data / "test", "--checkpoint", pretrained, "--device", "cpu",
                             "--min-confidence", threshold, "--json").stdout)
    labels = [line.split("\t")[1] for line in plain.stdout.splitlines() if "\t" in line]
    predicted = [p["predicted"] for p in as_json["predictions"]]
    assert len(labels) == len(predicted) == 18
    if threshold == "1.0":
        assert set(labels) == set(predicted) == {"unknown"}
        assert as_json["report"]["unknown"] == 18 and as_json["report"]["accuracy"] == 0
        assert "  18 unknown (top probability below --min-confidence), counted wrong" in plain.stdout
    else:
        assert "unknown" not in labels + predicted and "unknown" not in as_json["report"]
        assert predicted == [p["top"][0]["label"] for p in as_json["predictions"]]


def test_mistakes_draws_and_prints_the_most_confident_wrong_predictions(pretrained, tiny_data, tmp_path):
    swapped = tmp_path / "swapped"  # red and green images in each other's folders: many mistakes
    for source, target in (("red", "green"), ("green", "red"), ("blue", "blue")):
        shutil.copytree(tiny_data / "test" / source, swapped / target)
    picture = tmp_path / "mistakes.png"
    args = [swapped, "--checkpoint", pretrained, "--device", "cpu", "--mistakes", picture, "--mistakes-count", "5"]
    output = json.loads(run("predict.py", *args, "--json").stdout)
    wrong = sorted((p for p in output["predictions"] if p["predicted"] != p["true"]),
                   key=lambda p: -p["top"][0]["probability"])
    assert len(wrong) >= 5
    assert [m["path"] for m in output["mistakes"]] == [p["path"] for p in wrong[:5]]
    assert [m["probability"] for m in output["mistakes"]] == [p["top"][0]["probability"] for p in wrong[:5]]
    plain = run("predict.py", *args)
    header, *listed = plain.stdout.split("the 5 most confident mistakes (drawn in ")[1].splitlines()
    assert header == f"{picture}): path, predicted, probability, true"
    assert [line.split("\t")[0] for line in listed] == [p["path"] for p in wrong[:5]]
    assert [line.split("\t")[3] for line in listed] == [p["true"] for p in wrong[:5]]
    drawn = Image.open(picture)
    assert drawn.size == (max(5 * 98 + 2, 420), 34 + 96 + 28 + 4)  # one row of 5 tiles with two caption lines
    caption = np.asarray(drawn.crop((0, 34 + 96, 98, 34 + 96 + 14))).astype(int)  # the first tile's first line
    assert ((caption[..., 0] > 150) & (caption[..., 1:] < 60).all(2)).sum() > 20  # red: a wrong label


def test_a_class_named_unknown_is_a_class_not_an_uncertain_image(pretrained, tiny_data, tmp_path):
    """Before: images predicted as a class named `unknown` were left out of --mistakes, as uncertain ones are; with
    --min-confidence the two read alike. Uncertain images are no mistakes, and --mistakes says so."""
    first = json.loads(run("predict.py", tiny_data / "test", "--checkpoint", pretrained, "--device", "cpu",
                           "--json").stdout)["predictions"]
    mistaken = collections.Counter(p["predicted"] for p in first if p["predicted"] != p["true"])
    assert mistaken, "the session's pretrained model gets every test image right: this test needs a mistake"
    taken = mistaken.most_common(1)[0][0]
    checkpoint = torch.load(pretrained, weights_only=True)  # the class most often predicted wrongly, renamed
    checkpoint["classes"] = ["unknown" if name == taken else name for name in checkpoint["classes"]]
    torch.save(checkpoint, tmp_path / "renamed.pt")
    for name in ("red", "green", "blue"):
        shutil.copytree(tiny_data / "test" / name, tmp_path / "images" / ("unknown" if name == taken else name))
    args = [tmp_path / "images", "--checkpoint", tmp_path / "renamed.pt", "--device", "cpu", "--mistakes",
            tmp_path / "m.png"]
    output = json.loads(run("predict.py", *args, "--mistakes-count", "99", "--json").stdout)
    wrong = [p["path"] for p in output["predictions"] if p["predicted"] != p["true"]]
    assert sorted(m["path"] for m in output["mistakes"]) == sorted(wrong)
    assert any(m["predicted"] == "unknown" for m in output["mistakes"])
    assert error_line(run("predict.py", *args, "--min-confidence", "0.5", check=False)) == (
        f"predict.py: --min-confidence 0.5: {tmp_path / 'renamed.pt'} has a class named 'unknown', the label of an "
        "image below it; leave --min-confidence out")
    uncertain = run("predict.py", tiny_data / "test", "--checkpoint", pretrained, "--device", "cpu", "--mistakes",
                    tmp_path / "m.png", "--min-confidence", "1")
    assert uncertain.stderr.strip().splitlines()[-1] == (
        f"predict.py: no mistakes among the 18 labelled images (18 below --min-confidence: no claim, so no mistake); "
        f"--mistakes {tmp_path / 'm.png'} is not written")


def test_predicts_loss_says_the_temperature_it_is_taken_at(pretrained, tiny_data):
    """Before: predict.py's loss (of the calibrated probabilities) and the training's test report's (at temperature
    1) differed for the same images, nothing saying why."""
    temperature = torch.load(pretrained, weights_only=True)["temperature"]
    assert temperature != 1
    args = [tiny_data / "test", "--checkpoint", pretrained, "--device", "cpu"]
    report = json.loads(run("predict.py", *args, "--json").stdout)["report"]
    assert report["loss_temperature"] == temperature
    assert (f"18 labelled images: accuracy {report['accuracy']:.2%} on 18 images, loss {report['loss']:.4f} (at "
            f"temperature {temperature:.3g}, as the probabilities)") in run("predict.py", *args).stdout


def test_mistakes_with_no_mistake_is_said_and_no_picture_written(pretrained, tiny_data, tmp_path):
    first = json.loads(run("predict.py", tiny_data / "test", "--checkpoint", pretrained, "--device", "cpu",
                           "--json").stdout)["predictions"]
    right = next(Path(p["path"]) for p in first if p["predicted"] == p["true"])
    (tmp_path / "images" / right.parent.name).mkdir(parents=True)  # a labelled folder of one image it gets right
    shutil.copy(right, tmp_path / "images" / right.parent.name)
    result = run("predict.py", tmp_path / "images", "--checkpoint", pretrained, "--device", "cpu", "--mistakes",
                 tmp_path / "m.png")
    assert result.stderr.strip().splitlines()[-1] == (f"predict.py: no mistakes among the 1 labelled images; "
                                                      f"--mistakes {tmp_path / 'm.png'} is not written")
    assert not (tmp_path / "m.png").exists()


def test_mistakes_with_no_labelled_image_and_bad_picture_flags_are_one_line(pretrained, tiny_data, tmp_path):
    image = tiny_data / "test" / "red" / "0000.png"
    cases = [
        ([image, "--mistakes", tmp_path / "m.png"], f"--mistakes {tmp_path / 'm.png'}: none of the images has a "
         "known class, so none is a mistake; pass a folder whose sub-folders are the checkpoint's classes (e.g. "
         "data/cifar10/test)"),
        ([image, "--mistakes", tmp_path / "m.png", "--grid", tmp_path / "m.png"],
         f"--mistakes {tmp_path / 'm.png'}: is also --grid; pass two different files"),
        ([image, "--mistakes", tmp_path / "m.txt"], f"--mistakes {tmp_path / 'm.txt'}: Pillow cannot write a picture "
         "named like this; end it in .png or .jpg"),
    ]
    for args, message in cases:
        result = run("predict.py", *args, "--checkpoint", pretrained, "--device", "cpu", check=False)
        assert error_line(result) == f"predict.py: {message}"
        assert result.stdout == "" and not (tmp_path / "m.png").exists()
    for flag, value, message in (("--min-confidence", "1.5", "must be a probability from 0 to 1, got 1.5"),
                                 ("--min-confidence", "nan", "must be a probability from 0 to 1, got nan"),
                                 ("--mistakes-count", "0", "must be a positive integer, got 0")):
        result = run("predict.py", image, flag, value, check=False)
        assert result.returncode == 2 and error_line(result).endswith(f"argument {flag}: {message}")


@pytest.mark.slow
def test_a_resumed_run_draws_the_whole_run(tiny_data, tmp_path):
    out = tmp_path / "run.pt"
    run("pretrain.py", "--data-dir", tiny_data, "--out", out, "--epochs", "1", "--val-size", "6", *QUICK)
    run("pretrain.py", "--resume", out.with_suffix(".last.pt"), "--epochs", "2")
    train = pixels_of(Image.open(out.with_suffix(".png")), predict.CURVE_COLOURS["train"])
    loss_panel = train[(train[:, 0] > 84) & (train[:, 1] < 344)][:, 1]
    assert loss_panel.max() - loss_panel.min() > 100  # a line from epoch 1 to 2, not the resumed epoch's dot


def test_a_validation_loss_that_is_not_finite_is_left_out_of_the_curves():
    rows = history(3)
    rows[1]["val_loss"], rows[2]["val_loss"] = float("inf"), float("nan")
    picture = predict.learning_curves(rows, 1, "t")
    validation = pixels_of(picture, predict.CURVE_COLOURS["validation"])
    in_loss = validation[(validation[:, 0] > 84) & (validation[:, 1] < 344)]
    assert 0 < len(in_loss) < 40  # epoch 1's dot alone, no line to the others


def test_a_run_picture_onto_a_full_disk_is_one_line_and_keeps_the_previous_one(small_filesystem):
    path = small_filesystem("1m") / "run.png"
    curves = predict.learning_curves(history(2), 2, "t")
    pretrain.write_run_file(path, "learning curves", lambda f: curves.save(f, format="PNG"))
    before = path.read_bytes()
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8))  # 3 MB
    with pytest.raises(CheckpointError, match="run.png: cannot write the learning curves \\(No space left on dev"):
        pretrain.write_run_file(path, "learning curves", lambda f: noise.save(f, format="PNG"))
    assert path.read_bytes() == before and [p.name for p in path.parent.iterdir()] == ["run.png"]


def test_a_grid_caption_wider_than_its_tile_is_broken_not_cut(tmp_path):
    """Before: a wrong label with its true one, "automobile (airplane)", ran past the tile and was cut there."""
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    predict.draw_grid(str(tmp_path / "grid.png"), images, ["automobile", "cat"], ["airplane", "cat"])
    drawn = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB")).astype(int)
    assert drawn.shape[:2] == (2 + 96 + 28 + 2, 2 + 2 * 98)  # two caption lines under every tile
    red = (drawn[..., 0] > 150) & (drawn[..., 1:] < 60).all(2)
    rows, columns = np.nonzero(red[2 + 96:, :2 + 98])  # the first tile's caption
    assert columns.max() < 2 + 96 - 2  # within its tile, clear of its edge
    assert rows.min() < 14 and rows.max() > 14  # on both lines: the true label, in brackets, under the predicted


def test_a_tiny_learning_rate_is_labelled_within_its_panel():
    """Before: an lr of 1e-9 was labelled 0.00000000110, 13 characters that ran into the accuracy panel beside."""
    labels = [text for _, text in predict.ticks(0.9e-9, 1.1e-9, 6)]
    assert labels == ["9e-10", "9.5e-10", "1e-09", "1.05e-09", "1.1e-09"]
    assert [text for _, text in predict.ticks(0.028, 0.032, 6)] == ["0.028", "0.029", "0.030", "0.031", "0.032"]
    rows = [row | {"lr": 1e-9} for row in history(3)]
    picture = np.asarray(predict.learning_curves(rows, 2, "tiny lr").convert("L"))
    gap = picture[84:294, 2 * 360 - 16 + 2:2 * 360 + 70 - 60]  # between the accuracy panel and the lr labels' room
    assert (gap > 200).all()


def test_a_caption_word_wider_than_its_tile_ends_in_an_ellipsis_as_much_of_it_as_fits():
    """A class name of one long word: cut where it fits with its "…", the next words still drawn whole; a last letter
    wider than "…" is the only one cut where the rest fits (before: two, "eeeeeeeemm…" for eeeeeeeemmmW)."""
    chosen = predict.font(11)
    assert predict.fitted("Donaudampfschifffahrtsgesellschaft (cat)", chosen, 92)[1:] == ["(cat)"]
    for word in ["Donaudampfschifffahrtsgesellschaft", *("e" * 8 + "m" * n + "W" for n in range(6))]:
        [line] = predict.fitted(word, chosen, 92)
        kept = line.removesuffix("…")
        assert chosen.getlength(line) <= 92 and word.startswith(kept)
        assert kept == word or chosen.getlength(word[:len(kept) + 1] + "…") > 92, word
    assert predict.fitted("", chosen, 92) == [""]
