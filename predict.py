"""Classify images with a trained checkpoint.

    python predict.py img.png photos/ --topk 3
    python predict.py data/cifar10/test --limit 64 --grid predictions.png
"""
import signal

if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a Ctrl-C while torch loads: killed quietly (then cli.run_script's)

import argparse
import functools
import glob
import importlib
import os
import io
import json
import logging
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn

import cli
import data
from model import (TEMPERATURE_RANGE, CheckpointError, check_checkpoint_file, is_exported_program, load_checkpoint,
                   model_from_checkpoint)

DEFAULT_CHECKPOINTS = ("checkpoints/finetune.pt", "checkpoints/pretrain.pt")
GRID_TILE = 96  # px per image in the --grid picture
GRID_MAX = 64  # images drawn at most
PROGRAM_RECORD = "export.json"  # in an exported program's file (export.py): classes, sizes, where it came from
MATRIX_WIDTH = 120  # characters: a wider confusion matrix is printed as its most confused pairs
UNKNOWN = "unknown"  # the label of an image whose top probability is below --min-confidence
ECE_BINS = 15  # the expected calibration error's bins, as Guo et al. 2017


# --------------------------------------------------------------------------- the evaluation path

@torch.no_grad()
def compute_logits(model: nn.Module, batches: Iterable[torch.Tensor], image_size: int, flip: bool = False,
                   title: str | None = None, total: int = 0) -> torch.Tensor:
    """logits_of over uint8 batches, as training's validation and test take them; with a `title`, its progress shown."""
    model.eval()
    line = cli.ProgressLine(title, total)
    logits, done = [], 0
    for images in batches:
        logits.append(logits_of(model, images, image_size, flip))
        done += len(images)
        if line.due(done):
            line.show(done)
    line.close()
    return torch.cat(logits)


def logits_of(model: nn.Module, images: torch.Tensor, image_size: int, tta: bool = False,
              eval_resize: float = data.EVAL_RESIZE, temperature: float = 1.0) -> torch.Tensor:
    """A uint8 batch's fp32 logits through the evaluation transform and the model (in eval mode), over `temperature`
    (their softmax: predict's probabilities, a program's); the arguments after `images` are evaluation_of's."""
    x = data.eval_batch(images, image_size, eval_resize)
    logits = model(x).float()
    if tta:
        logits = (logits + model(x.flip(3)).float()) / 2
    return logits / temperature


def classification_report(logits: torch.Tensor, labels: torch.Tensor, classes: list[str],
                          min_confidence: float = 0.0) -> dict:
    """Accuracy, loss, per-class accuracy (= recall), precision and F1, their macro means, the confusion matrix; an
    image whose top probability is below `min_confidence` is `unknown`: in no column of the matrix, counted wrong."""
    labels, n = labels.to(logits.device), len(classes)
    probabilities, predicted = torch.softmax(logits, 1).max(1)
    known = (probabilities >= min_confidence).cpu()
    confusion = torch.bincount(labels.cpu()[known] * n + predicted.cpu()[known], minlength=n * n).view(n, n)
    counts, claimed, right = torch.bincount(labels.cpu(), minlength=n), confusion.sum(0), confusion.diag()
    # None (JSON null) where a share has nothing to divide, not 0 ("all wrong"); F1 = 2 TP / (2 TP + FP + FN).
    recall, precision, f1 = ([top / bottom if bottom else None for top, bottom in zip(tops.tolist(), bottoms.tolist())]
                             for tops, bottoms in ((right, counts), (right, claimed), (2 * right, counts + claimed)))
    report = {"images": len(labels), "loss": F.cross_entropy(logits, labels).item(),
              "accuracy": right.sum().item() / len(labels), "per_class_accuracy": dict(zip(classes, recall)),
              "per_class_precision": dict(zip(classes, precision)), "per_class_f1": dict(zip(classes, f1))}
    # Macro means over the classes with images or predictions (as scikit-learn's), a share of nothing as 0.
    for name, values in (("precision", precision), ("recall", recall), ("f1", f1)):
        present = [value or 0.0 for value, count, claims in zip(values, counts, claimed) if count or claims]
        report[f"macro_{name}"] = sum(present) / len(present)
    if min_confidence > 0:
        report["unknown"] = int((~known).sum())
    return report | {"confusion_matrix": confusion.tolist()}  # rows: true class, columns: predicted


def print_report(title: str, report: dict, classes: list[str]) -> None:
    temperature = report.get("loss_temperature")  # predict.py's: a training's test report takes the loss at 1
    at = f" (at temperature {temperature:.3g}, as the probabilities)" if temperature else ""
    print(f"{title}: accuracy {report['accuracy']:.2%} on {report['images']} images, loss {report['loss']:.4f}{at}")
    if "unknown" in report:
        print(f"  {report['unknown']} unknown (top probability below --min-confidence), counted wrong")
    classes = [cli.printable(name) for name in classes]  # a newline in a class folder's name would split a row
    width = max(len(name) for name in classes)
    rows = [(name, *(report[f"per_class_{kind}"][original] for kind in ("accuracy", "precision", "f1")))
            for name, original in zip(classes, report["per_class_accuracy"])]
    rows.append(("macro mean", *(report[f"macro_{kind}"] for kind in ("recall", "precision", "f1"))))
    table = max(width, len(rows[-1][0]))
    print(f"  {'class':>{table}}  accuracy  precision        F1  (accuracy of a class: its recall)")
    for name, *shares in rows:
        print(f"  {name:>{table}}  " + "   ".join(f"{'n/a':>8}" if value is None else f"{value:8.2%}"
                                                for value in shares))  # n/a: nothing to divide
    if "temperature" in report:
        print(f"calibration: temperature {report['temperature']:.3f} (fitted on the validation split); expected "
              f"calibration error ({ECE_BINS} bins) {report['ece']:.2%}, with the temperature "
              f"{report['ece_calibrated']:.2%}")
    if width + 2 + 6 * len(classes) > MATRIX_WIDTH:  # wider than a terminal: the pairs most often mistaken instead
        pairs = sorted((-count, true, predicted) for true, row in enumerate(report["confusion_matrix"])
                       for predicted, count in enumerate(row) if true != predicted and count)
        print(f"most confused pairs ({min(10, len(pairs))} of {len(pairs)}; the full matrix is in the JSON report: "
              "predict.py --json, a training run's .test.json):")
        for count, true, predicted in pairs[:10]:
            print(f"  {classes[true]} taken for {classes[predicted]}: {-count}")
        return
    print("confusion matrix (rows: true, columns: predicted):")
    print(" " * (width + 2) + " ".join(f"{name[:5]:>5}" for name in classes))
    for name, row in zip(classes, report["confusion_matrix"]):
        print(f"  {name:>{width}}" + " ".join(f"{count:5d}" for count in row))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T of softmax(logits / T) that minimises the NLL of `labels` (Guo et al. 2017): LBFGS on log T, so T > 0.
    Within TEMPERATURE_RANGE: on a split the model gets all right the likelihood grows without end as T shrinks."""
    logits, labels = logits.detach().float().cpu(), labels.cpu()
    log_temperature = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_temperature], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def scaled_nll() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_temperature.exp(), labels)
        loss.backward()
        return loss
    optimizer.step(scaled_nll)
    temperature = log_temperature.exp().item()
    return min(max(temperature, TEMPERATURE_RANGE[0]), TEMPERATURE_RANGE[1]) if math.isfinite(temperature) else 1.0


def expected_calibration_error(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """How far confidence is from accuracy: the top probabilities fall in `bins` equal bins of (0, 1]; each bin's
    |accuracy - mean confidence|, weighted by its share of the images, summed (Guo et al. 2017)."""
    confidence, predicted = probabilities.float().max(1)
    correct = (predicted == labels.to(predicted.device)).float()
    index = (confidence * bins).ceil().long().clamp(1, bins) - 1  # bin i holds (i/bins, (i+1)/bins]
    gap = torch.zeros(bins, device=confidence.device).index_add_(0, index, correct - confidence)
    return (gap.abs().sum() / len(labels)).item()


def calibration_report(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> dict:
    return {"temperature": temperature, "ece": expected_calibration_error(torch.softmax(logits, 1), labels),
            "ece_calibrated": expected_calibration_error(torch.softmax(logits / temperature, 1), labels)}


# --------------------------------------------------------------------------- pictures
# Drawn with Pillow and numpy only: Pillow's own font at a few sizes, a picture with its title (new_picture).

INK, FAINT = (40, 40, 40), (222, 222, 222)
CURVE_COLOURS = {"train": (31, 119, 180), "validation": (230, 110, 0), "kept": (0, 150, 60)}
SHADE = np.array([8, 48, 107])  # the darkest shade of the confusion matrix: a whole row in one cell
MATRIX_LABEL = 300  # px: a longer class name beside the confusion matrix is cut, ending in "…": the matrix stays big
TITLE_SIZE, TEXT_SIZE = 16, 12  # px


# Fonts with the letters Pillow's own lacks (accents, Cyrillic, CJK), the widest first, looked for once by name in
# the usual font folders (wide_fonts) when a class name needs one.
WIDE_FONTS = ("NotoSansCJK-Regular.ttc", "NotoSansCJKsc-Regular.otf", "SourceHanSans-Regular.ttc", "wqy-microhei.ttc",
              "DroidSansFallbackFull.ttf", "Arial Unicode.ttf", "msyh.ttc", "NotoSans-Regular.ttf", "DejaVuSans.ttf")
FONT_FOLDERS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.local/share/fonts", "~/.fonts", "/Library/Fonts",
                "/System/Library/Fonts", "C:/Windows/Fonts")


def font(size: int, texts: Iterable[str] = ()) -> ImageFont.FreeTypeFont:
    """Pillow's own scalable font, or a font of the machine's with the letters of TEXTS (class names) it lacks."""
    return font_for("".join(sorted(set("".join(texts)) - set(" \t\n"))), size)


@functools.cache
def font_for(letters: str, size: int) -> ImageFont.FreeTypeFont:
    """The first of Pillow's own font and wide_fonts that draws every one of LETTERS; without one, the first that
    lacks the fewest (DejaVu's Hebrew drawn beside an emoji none has), and one warning line naming those."""
    best = ImageFont.load_default(size)
    missing = lacked(best, letters)
    for path in wide_fonts() if missing else ():  # the folders walked only for a letter Pillow's font lacks
        chosen = ImageFont.truetype(path, size)
        if len(lacks := lacked(chosen, letters)) < len(missing):
            best, missing = chosen, lacks
        if not missing:
            return best
    if missing:
        warn_boxes(missing)
    return best


@functools.cache
def wide_fonts() -> list[str]:
    found = {}
    for folder in FONT_FOLDERS:
        for parent, _, names in os.walk(os.path.expanduser(folder)):
            found |= {name: os.path.join(parent, name) for name in names if name in WIDE_FONTS and name not in found}
    return [found[name] for name in WIDE_FONTS if name in found]


def lacked(chosen: ImageFont.FreeTypeFont, letters: str) -> str:
    """The LETTERS the font draws as its box for a missing letter (its drawing of an unassigned code point)."""
    def drawn(letter: str) -> bytes:
        picture = Image.new("L", (2 * chosen.size, 2 * chosen.size))
        ImageDraw.Draw(picture).text((0, 0), letter, font=chosen, fill=255)
        return picture.tobytes()
    box = drawn("\U0010fffd")
    return "".join(letter for letter in letters if drawn(letter) == box)


@functools.cache
def warn_boxes(letters: str) -> None:
    print(f"warning: no font found here draws the letters {cli.printable(letters)} of the class names (looked for "
          f"{WIDE_FONTS[0]} and others in the usual font folders): they are drawn as boxes", file=sys.stderr)


def new_picture(width: int, height: int, title: str) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """A white picture with `title` centred at its top (TITLE_SIZE px, in the top 30 px), widened to hold it."""
    width = max(width, int(font(TITLE_SIZE).getlength(title)) + 16)
    picture = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(picture)
    draw.text((width // 2, 8), title, fill=INK, font=font(TITLE_SIZE), anchor="mt")
    return picture, draw


def ticks(low: float, high: float, most: int, percent: bool = False, least_step: float = 0.0) -> list[tuple]:
    """Round values within [low, high], at most `most` of them, a step of 1, 2, 2.5 or 5 times a power of ten (at
    least `least_step`), each with its text: as many decimals as the step needs, beyond six as significant digits
    (1.1e-09) (a percentage: of the value x 100)."""
    step = 10 ** math.floor(math.log10((high - low) / most))
    step = max(next(step * m for m in (1, 2, 2.5, 5, 10) if (high - low) / (step * m) <= most), least_step)
    scale = 100 if percent else 1
    power = math.floor(math.log10(step * scale) + 1e-9)
    quarter = round(step * scale / 10 ** power, 6) == 2.5  # a step of 0.25 needs two decimals
    decimals = max(0, -power + quarter)  # beyond six, an lr of 1e-9 as 0.00000000110 reached into the next panel
    spec = (f".{math.floor(math.log10(max(abs(low), abs(high)) * scale)) - power + 1 + quarter}g" if decimals > 6
            else f".{decimals}f")
    return [(value, f"{value * scale:{spec}}" + (" %" if percent else ""))
            for value in np.arange(math.ceil(low / step) * step, high + step * 1e-6, step)]


def plot(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str, percent: bool, epochs: list[int],
         series: dict[str, list[float]], kept: int) -> None:
    """One panel of learning_curves in `box` (px): a curve per column of `series`, a dot at each value (one epoch
    still shows), none at a value not finite (an overflowed loss); a margin: a line on the box's edge is hard to see."""
    left, top, right, bottom = box
    finite = [y for ys in series.values() for y in ys if math.isfinite(y)] or [0.0]
    margin = (max(finite) - min(finite)) * 0.08 or abs(max(finite)) * 0.1 or 1.0
    x_range = (min(epochs + [kept]) - 0.5, max(epochs) + 0.5)
    y_range = (max(min(finite) - margin, 0.0 if "lr" in series else -math.inf), max(finite) + margin)

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_range[0]) / (x_range[1] - x_range[0]) * (right - left),
                bottom - (y - y_range[0]) / (y_range[1] - y_range[0]) * (bottom - top))
    small = font(TEXT_SIZE)
    for y, text in ticks(*y_range, 6, percent):
        draw.line([(left, at(0, y)[1]), (right, at(0, y)[1])], fill=FAINT)
        draw.text((left - 4, at(0, y)[1]), text, fill=INK, font=small, anchor="rm")
    for x, text in ticks(*x_range, 10, least_step=1):
        draw.line([(at(x, 0)[0], top), (at(x, 0)[0], bottom)], fill=FAINT)
        draw.text((at(x, 0)[0], bottom + 4), text, fill=INK, font=small, anchor="mt")
    draw.rectangle(box, outline=INK)
    draw.text(((left + right) / 2, bottom + 20), "epoch", fill=INK, font=small, anchor="mt")
    draw.text(((left + right) / 2, top - 6), title, fill=INK, font=font(TEXT_SIZE + 2), anchor="md")
    for y in range(top, bottom, 8):
        draw.line([(at(kept, 0)[0], y), (at(kept, 0)[0], min(y + 4, bottom))], fill=CURVE_COLOURS["kept"], width=2)
    for column, ys in series.items():
        colour = CURVE_COLOURS["validation" if column.startswith("val") else "train"]
        points = [at(x, y) for x, y in zip(epochs, ys) if math.isfinite(y)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2, joint="curve")
        for x, y in points:
            draw.ellipse([(x - 2.5, y - 2.5), (x + 2.5, y + 2.5)], fill=colour)


def learning_curves(history: list[dict], kept: int, title: str) -> Image.Image:
    """A run's epochs (its .csv rows): loss, accuracy and learning rate side by side, under a legend; a dashed line
    marks the epoch kept (best validation; 0: the starting weights, a row of validation alone)."""
    panel, height, small = 360, 340, font(TEXT_SIZE)
    picture, draw = new_picture(3 * panel, height, title)
    panels = (("loss", ("train_loss", "val_loss"), False), ("accuracy", ("train_acc", "val_acc"), True),
              ("learning rate (at the epoch's end)", ("lr",), False))
    for i, (name, columns, percent) in enumerate(panels):
        plot(draw, (i * panel + 70, 84, (i + 1) * panel - 16, height - 46), name, percent,
             [row["epoch"] for row in history], {c: [row.get(c, math.nan) for row in history] for c in columns}, kept)
    legend = ("training", "validation", f"kept: epoch {kept}" + (" (the starting weights)" if kept == 0 else "") +
              ", the best validation accuracy")  # in CURVE_COLOURS' order
    x = (picture.width - sum(24 + small.getlength(name) + 20 for name in legend)) / 2
    for name, colour in zip(legend, CURVE_COLOURS.values()):
        draw.line([(x, 40), (x + 18, 40)], fill=colour, width=3)
        draw.text((x + 24, 40), name, fill=INK, font=small, anchor="lm")
        x += 24 + small.getlength(name) + 20
    return picture


def confusion_picture(confusion: list[list[int]], classes: list[str], title: str) -> Image.Image:
    """The confusion matrix shaded by each cell's share of its row (its true class), counts where they fit; the cells
    shrink with more classes (100 classes: 9 px) so that the picture stays about 1,000 px square."""
    n, names = len(classes), [cli.printable(name) for name in classes]
    counts = np.array(confusion, dtype=np.int64).reshape(n, n)
    cell = int(np.clip(900 // n, 9, 56))
    label_font, small = font(int(np.clip(cell - 2, 8, TEXT_SIZE)), names), font(TEXT_SIZE)
    names = [cut(name, label_font, MATRIX_LABEL) for name in names]
    count_font = font(int(np.clip(cell // 3, 8, TEXT_SIZE)))
    label = int(max(label_font.getlength(name) for name in names)) + 8
    left, top, side = 30 + label, 40, n * cell
    picture, draw = new_picture(left + side + 90, top + side + label + 30, title)
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    shade = (255 - shares[..., None] * (255 - SHADE)).astype(np.uint8)
    picture.paste(Image.fromarray(shade.repeat(cell, 0).repeat(cell, 1)), (left, top))
    for (row, column), count in np.ndenumerate(counts):
        if count and count_font.getlength(str(count)) <= cell - 2 and cell >= 14:
            draw.text((left + (column + 0.5) * cell, top + (row + 0.5) * cell), str(count), font=count_font,
                      anchor="mm", fill="white" if shares[row, column] > 0.5 else INK)
    draw.rectangle([(left - 1, top - 1), (left + side, top + side)], outline=INK)
    columns = Image.new("RGB", (label, side), "white")  # the column names, drawn across, then turned upright
    for i, name in enumerate(names):
        draw.text((left - 4, top + (i + 0.5) * cell), name, fill=INK, font=label_font, anchor="rm")
        ImageDraw.Draw(columns).text((label - 4, (i + 0.5) * cell), name, fill=INK, font=label_font, anchor="rm")
    picture.paste(columns.rotate(90, expand=True), (left, top + side + 4))
    draw.text((left + side / 2, top + side + label + 8), "predicted", fill=INK, font=small, anchor="mt")
    true = Image.new("RGB", (side, 20), "white")
    ImageDraw.Draw(true).text((side / 2, 10), "true", fill=INK, font=small, anchor="mm")
    picture.paste(true.rotate(90, expand=True), (4, top))
    x, height = left + side + 16, min(side, 200)  # what the shades mean: a bar from 100 % of a row (top) to 0 %
    bar = (255 - np.linspace(1, 0, height)[:, None, None] * (255 - SHADE)).astype(np.uint8).repeat(14, 1)
    picture.paste(Image.fromarray(bar), (x, top))
    draw.rectangle([(x - 1, top - 1), (x + 14, top + height)], outline=INK)
    for text, y in (("100 %", top), ("of its row", top + height / 2), ("0 %", top + height)):
        draw.text((x + 18, y), text, fill=INK, font=small, anchor="lm")
    return picture


def fitted(text: str, chosen: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """TEXT in lines drawn within WIDTH px, broken at spaces; a word wider than that cut, ending in '…'."""
    lines = []
    for word in text.split(" "):
        if lines and chosen.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
            continue
        lines.append(cut(word, chosen, width))
    return lines


def cut(text: str, chosen: ImageFont.FreeTypeFont, width: int) -> str:
    """TEXT as drawn within WIDTH px: whole, or cut ending in '…'."""
    while len(text) > 1 and chosen.getlength(text) > width:
        text = text.removesuffix("…")[:-1] + "…"  # one letter less each time, the first too
    return text


def tiles(images: torch.Tensor, captions: list[list[tuple[str, str]]]) -> Image.Image:
    """The images as GRID_TILE px tiles, 8 a row 2 px apart, each with its caption's lines (text, colour) under it,
    a line wider than a tile broken (before: cut at the tile's edge, "automobile (airpla")."""
    caption_font = font(11, [t for c in captions for t, _ in c])
    captions = [[(part, colour) for text, colour in c for part in fitted(text, caption_font, GRID_TILE - 4)]
                for c in captions]
    height = GRID_TILE + 14 * max(map(len, captions))
    grid = Image.new("RGB", (2 + min(8, len(images)) * (GRID_TILE + 2), 2 + -(-len(images) // 8) * (height + 2)))
    for n, (image, caption) in enumerate(zip(images, captions)):
        tile = Image.new("RGB", (GRID_TILE, height), "black")
        tile.paste(Image.fromarray(image.permute(1, 2, 0).numpy()).resize((GRID_TILE, GRID_TILE), Image.NEAREST))
        for i, (text, colour) in enumerate(caption):
            ImageDraw.Draw(tile).text((2, GRID_TILE + 1 + 14 * i), text, fill=colour, font=caption_font)
        grid.paste(tile, (2 + n % 8 * (GRID_TILE + 2), 2 + n // 8 * (height + 2)))
    return grid


def save_picture(picture: Image.Image, path: Path, flag: str) -> None:
    """Atomically: a full disk leaves the old picture. `path`'s ending is one Pillow writes (checked first)."""
    picture_format = Image.registered_extensions()[path.suffix.lower()]
    try:
        cli.write_atomically(path, lambda f: picture.save(f, format=picture_format))
    except OSError as e:
        raise cli.UsageError(f"{flag} {path}: cannot write ({e.strerror or e}); free space or choose another path"
                             ) from None


def draw_grid(path: str, images: torch.Tensor, predicted: list[str], true: list[str | None]) -> None:
    """Tiles of the images with the predicted label under each (green right, red wrong, white unknown)."""
    captions = [[(guess if label is None or label == guess else f"{guess} ({label})",
                  "white" if label is None else ("lime" if label == guess else "red"))]
                for guess, label in zip(predicted, true)]
    save_picture(tiles(images, captions), Path(path), "--grid")


# --------------------------------------------------------------------------- prediction

def find_images(paths: list[str], classes: list[str]) -> tuple[list[tuple[Path, int | None]], list[str]]:
    """Files to predict, each once, with their class index when known (folder_images), an error line per bad path.
    A name with * or ? that names no file (nor a URL) is expanded: cmd.exe and PowerShell pass `*.jpg` on as typed
    (their [ is a letter: `photo[1].png` is no pattern for photo1.png)."""
    found, errors, names = [], [], []
    for name in paths:
        wildcard = ("*" in name or "?" in name) and not Path(name).exists() and not data.URL.match(name)
        matches = sorted(glob.glob(name.replace("[", "[[]"), recursive=True)) if wildcard else [name]
        if not matches:
            errors.append(f"{cli.shown(name)}: no file matches this wildcard; check the pattern")
        names += matches
    for name in names:
        path = Path(name)
        if not name:  # Path("") is the current folder
            errors.append("'': an empty path; pass image files or folders")
        elif path.is_file():
            found.append((path, None))
        elif path.is_dir():
            try:
                found += folder_images(path, classes)
            except cli.DataError as e:  # an unreadable or empty folder: that path's line, the others still predicted
                errors.append(str(e))
        elif path.exists():  # a device, FIFO or socket: reading it would never end, or wait for a writer
            kind = cli.special_kind(path.stat().st_mode)
            errors.append(f"{cli.shown(path)}: {kind}, not an image file or a folder; pass image files or folders")
        elif data.URL.match(name):
            errors.append(f"{name}: a URL; predict.py reads local files: download it first (e.g. curl -O {name})")
        else:
            errors.append(f"{cli.shown(path)}: no such file or folder; check the path")
    # Each image once, or the accuracy counts it twice (`d/test d/test`): its first name, with any name's label.
    kept: dict[Path, tuple[Path, int | None]] = {}
    for path, label in found:
        key = path.resolve()
        first, first_label = kept.get(key, (path, None))
        kept[key] = (first, label if first_label is None else first_label)
    if len(kept) < len(found):
        print(f"predict.py: note: {len(found) - len(kept)} image(s) named more than once by the paths given: each is "
              "predicted once", file=sys.stderr)
    return list(kept.values()), errors


def folder_images(path: Path, classes: list[str]) -> list[tuple[Path, int | None]]:
    """A folder's images, labelled by the class folder they lie in when its sub-folders include the checkpoint's
    classes (a note on stderr for the others); none, or an unreadable folder: a DataError."""
    files, left_out = data.image_files(path)
    data.warn_left_out(cli.shown(path), path, left_out)
    folders = [p for p in data.folder_entries(path) if p.is_dir() and not p.name.startswith(".")]
    labelled = any(p.name in classes for p in folders)
    loosely = {data.alike(name): name for name in classes}  # ImageFolder's names are exact: only a note for these
    matches = {name: loosely.get(data.alike(name)) for name in sorted(p.name for p in folders if p.name not in classes)}
    near = [(name, match) for name, match in matches.items() if match is not None]
    others = [cli.shown(name) for name, match in matches.items() if match is None]
    if near:
        print(f"predict.py: note: {cli.shown(path)}: {len(near)} sub-folder(s) named as a class of the checkpoint but "
              f"for case or Unicode normalisation (such as {data.spelled(near[0][0])} for {data.spelled(near[0][1])}): "
              "their images are predicted unlabelled; rename them to the classes' names for the accuracy",
              file=sys.stderr)
    if labelled and others:
        print(f"predict.py: note: {cli.shown(path)}: {len(others)} sub-folder(s) named like no class of the "
              f"checkpoint ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}): their images are "
              "predicted unlabelled, the class folders' with their labels", file=sys.stderr)
    elif not labelled and any((path / "test" / name).is_dir() for name in classes):
        print(f"predict.py: note: {cli.shown(path)} is a data folder (train/, test/): its images are predicted "
              f"unlabelled; pass {cli.shown(path / 'test')} for the test split's accuracy", file=sys.stderr)
    index = {name: i for i, name in enumerate(classes)} if labelled else {}
    # The class folder an image lies in; one beside the class folders, or in a hidden folder, has none.
    found = [(p, index.get(p.relative_to(path).parts[0]) if p.parent != path else None) for p in files]
    if not found:
        raise cli.DataError(f"{cli.shown(path)}: no images in this folder ({', '.join(data.IMAGE_EXTENSIONS)})")
    return found


def load_classifier(path: str, device: torch.device) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict]:
    """A checkpoint, or a program export.py wrote, as a function from uint8 images at the stored size to logits on
    `device`, and what describes it (classes, stored_size: the checkpoint, or the record in the program's file)."""
    check_checkpoint_file(path)
    if not is_exported_program(path):
        checkpoint = load_trained(path)
        model = model_from_checkpoint(checkpoint, path).to(device).eval()
        return functools.partial(logits_of, model, **evaluation_of(checkpoint)), checkpoint
    from torch.export.passes import move_to_device_pass  # here: an older torch has none, and cli.py says so first
    program, about = load_program(path)
    return functools.partial(log_probabilities, move_to_device_pass(program, device).module()), about


def load_trained(path: str) -> dict:
    """A run's checkpoint; its resume state (.last.pt) is refused: the last epoch's raw weights, not those chosen."""
    checkpoint = load_checkpoint(path)
    if "optimizer" in checkpoint:
        best = Path(path).with_name(Path(str(checkpoint.get("args", {}).get("out", "X.pt"))).name)
        raise CheckpointError(f"{path}: a run's resume state, its last epoch's weights (not the best validation "
                              f"epoch's, nor calibrated or averaged); pass the run's checkpoint, {best}")
    return checkpoint


def load_exported(file, **options) -> torch.export.ExportedProgram:
    """torch.export.load, without torch 2.11's warning that the buffer it reads its own file into is read-only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given buffer is not writable", UserWarning)
        return torch.export.load(file, **options)


def load_program(path: str) -> tuple[torch.export.ExportedProgram, dict]:
    """A program export.py wrote, and the record it holds (PROGRAM_RECORD); anything else is one line."""
    check_checkpoint_file(path)
    if not is_exported_program(path):
        raise CheckpointError(f"{path}: not an exported program; pass a file export.py wrote, or export this "
                              f"checkpoint first: python export.py --checkpoint {path}")
    record = {PROGRAM_RECORD: ""}
    torch_log = logging.getLogger("torch.export")  # it logs a traceback before it raises: the line below says it
    torch_log.disabled = True
    try:  # from a file object: torch warns of a path not ending in .pt2 (and means to refuse one)
        with open(path, "rb") as file:
            try:
                program = load_exported(file, extra_files=record)
            except Exception:  # noqa: BLE001 - one exported before the crop was torch's own: torchvision's roi_align
                importlib.import_module("torchvision")  # registers it (a second, so only then); else the line below
                file.seek(0)
                program = load_exported(file, extra_files=record)
        return program, json.loads(record[PROGRAM_RECORD])
    except Exception:  # noqa: BLE001 - torch raises many types for a damaged or foreign archive
        raise CheckpointError(f"{path}: an exported program that cannot be loaded (damaged, or without "
                              f"{PROGRAM_RECORD}: not written by export.py); export it again") from None
    finally:
        torch_log.disabled = False


def evaluation_of(checkpoint: dict) -> dict:
    """A checkpoint's (or a program record's) input size, --tta, resize before the centre crop and temperature; an
    older one lacks the last three."""
    return {"image_size": checkpoint["image_size"], "tta": checkpoint.get("tta", False),
            "eval_resize": checkpoint.get("eval_resize", data.EVAL_RESIZE),
            "temperature": float(checkpoint.get("temperature", 1.0))}


def log_probabilities(program: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """A program's probabilities as logits: softmax gives them back, and the loss is the same (a probability that
    underflowed to 0 as the smallest float, not as -inf: an infinite loss)."""
    return program(images).clamp_min(torch.finfo(torch.float32).tiny).log()


DEFAULT_RULE = f"the newer of {' and '.join(DEFAULT_CHECKPOINTS)} (the first if both are as new)"


def checkpoint_given(checkpoint: str | None, program: str) -> str:
    """--checkpoint, else DEFAULT_RULE's, said on stderr: a finetune.pt left from before pretrain.pt was trained again
    is not taken."""
    if checkpoint is not None:
        if checkpoint == "":  # `or` would fall back to the default checkpoints without a word
            raise cli.UsageError(f"--checkpoint is empty; pass a checkpoint file, or leave the flag out to use "
                                 f"{DEFAULT_RULE}")
        return checkpoint
    found = [path for path in DEFAULT_CHECKPOINTS if Path(path).is_file()]
    if not found:
        raise CheckpointError(f"no checkpoint given and none of {', '.join(DEFAULT_CHECKPOINTS)} exists under the "
                              "current folder; train first (invoke all, or python pretrain.py) or pass --checkpoint")
    path = max(found, key=lambda p: Path(p).stat().st_mtime_ns)
    print(f"{program}: checkpoint {path} (no --checkpoint given: {DEFAULT_RULE})", file=sys.stderr)
    return path


def read_images(found: list[tuple[Path, int | None]], size: int, errors: list[str]
                ) -> tuple[torch.Tensor | None, list[int]]:
    """The files decoded as the training cache was, and which were read; an unreadable one's line: stderr, `errors`."""
    decoded, kept = [], []
    for i, (path, _) in enumerate(found):
        try:
            decoded.append(data.decode(path, size)[0])
            kept.append(i)
        except cli.DataError as e:
            errors.append(str(e))
            print(f"predict.py: {e}", file=sys.stderr)
    # one copy into the training layout: torch.stack of permuted images takes many times longer
    return (torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).contiguous() if decoded else None), kept


def top_classes(logits: torch.Tensor, kept: list[tuple[Path, int | None]], classes: list[str], k: int,
                min_confidence: float) -> list[dict]:
    """Per image: its path (the real name, surrogate-escaped where not UTF-8: JSON's \\udcNN gives its bytes back),
    its true class, the predicted one (UNKNOWN below `min_confidence`) and the k most probable."""
    top = torch.softmax(logits, 1).topk(min(k, len(classes)), dim=1)
    return [{"path": str(path), "true": None if label is None else classes[label],
             "predicted": classes[indices[0]] if probabilities[0] >= min_confidence else UNKNOWN,
             "top": [{"label": classes[i], "probability": p} for p, i in zip(probabilities, indices)]}
            for (path, label), probabilities, indices in zip(kept, top.values.tolist(), top.indices.tolist())]


def result_line(result: dict) -> str:
    """An image's line: its path, then the k most probable labels (the first `unknown` when the image is) with their
    probabilities. Names escaped (cli.shown): a tab or newline would split the line (the JSON holds the real name)."""
    labels = [result["predicted"]] + [t["label"] for t in result["top"][1:]]
    return cli.shown(result["path"]) + "".join(f"\t{cli.printable(label)}\t{t['probability']:.4f}"
                                               for label, t in zip(labels, result["top"])) + "\n"


def check_picture_path(flag: str, picture: str) -> None:
    """--grid or --mistakes, before any prediction: a picture file Pillow can write, in a writable folder."""
    if picture == "":  # `if args.grid` would draw no picture without a word
        raise cli.UsageError(f"{flag} is empty; pass a picture file, or leave the flag out for no picture")
    path = Path(picture)
    try:  # in RGB: some formats Pillow lists as writable take only 1-bit (XBM), palette or others (MSP, PALM, HDF5)
        if not os.path.isdir(path):  # False where the path cannot be reached: check_writable_file says why
            Image.new("RGB", (1, 1)).save(io.BytesIO(), format=Image.registered_extensions().get(path.suffix.lower()))
    except (KeyError, ValueError, OSError, TypeError):
        raise cli.UsageError(f"{flag} {picture}: Pillow cannot write a picture named like this; end it in .png or .jpg"
                             ) from None
    cli.check_writable_file(flag, path, "predictions.png" if flag == "--grid" else "mistakes.png", "a picture file")


def predict(args: argparse.Namespace) -> int:
    pictures = {flag: path for flag, path in (("--grid", args.grid), ("--mistakes", args.mistakes)) if path is not None}
    for flag, picture in pictures.items():
        check_picture_path(flag, picture)
    if len(pictures) == 2 and Path(args.grid).resolve() == Path(args.mistakes).resolve():  # it would keep the second
        raise cli.UsageError(f"--mistakes {args.mistakes}: is also --grid; pass two different files")
    checkpoint_path = checkpoint_given(args.checkpoint, "predict.py")
    device = cli.resolve_device(args.device)
    classify, checkpoint = load_classifier(checkpoint_path, device)
    classes = checkpoint["classes"]
    if args.min_confidence > 0 and UNKNOWN in classes:  # its images and the uncertain ones would read alike
        raise cli.UsageError(f"--min-confidence {args.min_confidence}: {checkpoint_path} has a class named "
                             f"'{UNKNOWN}', the label of an image below it; leave --min-confidence out")

    found, errors = find_images(args.paths, classes)
    for flag, picture in pictures.items():  # writing it would overwrite an image it is about to show
        target = Path(picture).resolve()
        if any(path.resolve() == target for path, _ in found):
            raise cli.UsageError(f"{flag} {picture}: is one of the images to predict, and writing the picture would "
                                 "overwrite it; choose another path")
    if args.mistakes and found and all(label is None for _, label in found):
        raise cli.UsageError(f"--mistakes {args.mistakes}: none of the images has a known class, so none is a mistake; "
                             "pass a folder whose sub-folders are the checkpoint's classes (e.g. data/cifar10/test)")
    if args.limit is not None and args.limit < len(found):
        labels = torch.tensor([-1 if label is None else label for _, label in found]) + 1
        found = [found[i] for i in data.stratified_split(labels, args.limit, seed=0)[0]]
    for line in errors:
        print(f"predict.py: {line}", file=sys.stderr)
    done = predict_in_batches(classify, found, checkpoint, args, device, errors)
    if not done.results:
        print("predict.py: no image could be read; pass image files or folders of images", file=sys.stderr)
        return 1
    # Accuracy over the images whose class is known: a labelled folder may hold a few others, or files come too.
    report = (classification_report(torch.cat(done.logits), torch.tensor(done.labels), classes, args.min_confidence)
              if done.labels else None)
    if report is not None and (temperature := evaluation_of(checkpoint)["temperature"]) != 1:
        report["loss_temperature"] = temperature  # its logits' (logits_of); a test report's loss is at 1
    mistakes = [{key: done.results[i][key] for key in ("path", "predicted", "true")} | {"probability": p}
                for p, i, _ in done.mistakes]
    if args.json:
        print(cli.json_text({"checkpoint": checkpoint_path, "predictions": done.results, "report": report}
                            | ({"mistakes": mistakes} if args.mistakes else {}) | {"errors": errors}, indent=1))
    elif report is not None:
        print_report(f"{len(done.labels)} labelled images", report, classes)
    draw_predicted_pictures(args, done, mistakes)
    check_results_written()
    return 1 if errors else 0


def draw_predicted_pictures(args: argparse.Namespace, done: "Predicted", mistakes: list[dict]) -> None:
    """--grid and --mistakes, also when stdout is closed (`| head`): the pictures were asked for as well."""
    if args.grid and not done.tiles:  # the images picked for it were all unreadable
        print(f"predict.py: none of the images picked for --grid {args.grid} could be read; it is not written",
              file=sys.stderr)
    elif args.grid:
        draw_grid(args.grid, torch.stack([image for _, image in done.tiles]),
                  *([done.results[i][key] for i, _ in done.tiles] for key in ("predicted", "true")))
        print(f"wrote {args.grid} ({len(done.tiles)} images)", file=sys.stderr)
    if args.mistakes and not mistakes:
        unknown = sum(r["true"] is not None and r["predicted"] == UNKNOWN for r in done.results)
        below = f" ({unknown} below --min-confidence: no claim, so no mistake)" * bool(unknown and args.min_confidence)
        print(f"predict.py: no mistakes among the {len(done.labels)} labelled images{below}; --mistakes "
              f"{args.mistakes} is not written", file=sys.stderr)
    elif args.mistakes:  # each tile titled with the predicted label, its probability and the true label
        grid = tiles(torch.stack([image for _, _, image in done.mistakes]),
                     [[(f"{m['predicted']} {m['probability']:.0%}", "red"), (f"true: {m['true']}", "white")]
                      for m in mistakes])
        picture, _ = new_picture(grid.width, grid.height + 34,
                                 f"the {len(mistakes)} most confident mistakes of {len(done.labels)} labelled images")
        picture.paste(grid, ((picture.width - grid.width) // 2, 34))
        save_picture(picture, Path(args.mistakes), "--mistakes")
        if not args.json:
            print(f"the {len(mistakes)} most confident mistakes (drawn in {args.mistakes}): path, predicted, "
                  "probability, true")
            print("".join(f"{cli.shown(m['path'])}\t{cli.printable(m['predicted'])}\t{m['probability']:.4f}\t"
                          f"{cli.printable(m['true'])}\n" for m in mistakes), end="")
        print(f"wrote {args.mistakes} ({len(mistakes)} images)", file=sys.stderr)


@dataclass
class Predicted:
    """A pass's result per image, the labelled ones' logits, the --grid images as (index of their result, image), and
    the most confident mistakes as (probability, index of the result, image); never all the images."""
    results: list[dict] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    tiles: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    mistakes: list[tuple[float, int, torch.Tensor]] = field(default_factory=list)


@torch.no_grad()
def predict_in_batches(classify: Callable[[torch.Tensor], torch.Tensor], found: list[tuple[Path, int | None]],
                       checkpoint: dict, args: argparse.Namespace, device: torch.device, errors: list[str]
                       ) -> Predicted:
    """Decode and predict (`classify`: see load_classifier) --batch-size images at a time, each line printed as it
    comes: a folder of any size predicts in bounded memory; --grid's GRID_MAX images spread evenly over the files."""
    done = Predicted()
    grid = set(torch.linspace(0, len(found) - 1, min(GRID_MAX, len(found))).round().long().tolist() if args.grid
               else [])
    line = cli.ProgressLine(None if args.json else "predict", len(found))
    for start in range(0, len(found), args.batch_size):
        line.close()  # erased before this batch's lines: on a terminal they would follow it on its line
        batch = found[start:start + args.batch_size]
        images, kept = read_images(batch, checkpoint["stored_size"], errors)
        if images is not None:
            logits = classify(images.to(device)).cpu()
            results = top_classes(logits, [batch[i] for i in kept], checkpoint["classes"], args.topk,
                                  args.min_confidence)
            labelled = [j for j, i in enumerate(kept) if batch[i][1] is not None]
            done.logits.append(logits[labelled])
            done.labels += [batch[kept[j]][1] for j in labelled]
            # Images are copied out of their batch: a view would keep it whole.
            done.tiles += [(len(done.results) + j, images[j].clone()) for j, i in enumerate(kept) if start + i in grid]
            if args.mistakes:  # the most probable wrong predictions so far; an unknown one is no claim, so no mistake
                done.mistakes += [(r["top"][0]["probability"], len(done.results) + j, images[j].clone())
                                  for j, r in enumerate(results)
                                  if r["true"] is not None and r["predicted"] != r["true"]
                                  and r["top"][0]["probability"] >= args.min_confidence]
                done.mistakes = sorted(done.mistakes, key=lambda m: (-m[0], m[1]))[:args.mistakes_count]
            done.results += results
            if not args.json:
                print("".join(map(result_line, results)), end="", flush=True)
        if getattr(sys.stdout, "lost", None) and not (args.grid or args.mistakes):  # `| head` has gone: no reader
            break
        if line.due(start + len(batch)):
            line.show(start + len(batch))
    line.close()
    return done


def check_results_written() -> None:
    """stdout closed early (`| head`) ends predict quietly, as Unix tools do: with 128 + SIGPIPE, as if killed by it.
    Any other failure to write them (a full disk) is one line; they were written whole or not at all (Output)."""
    sys.stdout.flush()
    lost = getattr(sys.stdout, "lost", None)
    if isinstance(lost, BrokenPipeError):
        sys.exit(128 + getattr(signal, "SIGPIPE", 13))  # 13 wherever there is one; Windows has none
    if lost is not None:
        raise cli.UsageError(f"cannot write the results to stdout ({lost.strerror or lost}); none were kept: free "
                             "space, or send them elsewhere")


def build_parser() -> argparse.ArgumentParser:
    """predict.py's flags, also the `invoke predict` task's."""
    parser = cli.ArgumentParser(__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("paths", nargs="+", metavar="IMAGE_OR_DIR", help="image files and folders of images")
    add("--checkpoint", default=None, help=f"default: {DEFAULT_RULE}, named on stderr")
    add("--topk", type=cli.positive_int, default=1, help="how many classes to show per image")
    add("--json", action="store_true", help="print JSON instead of lines")
    add("--grid", default=None, metavar="PATH",
        help=f"also draw up to {GRID_MAX} images with their labels here (default: none)")
    add("--mistakes", default=None, metavar="PATH",
        help="also draw the labelled images predicted wrong with the highest probability here (default: none)")
    add("--mistakes-count", type=cli.positive_int, default=16, metavar="N", help="how many mistakes --mistakes draws")
    add("--min-confidence", type=cli.probability, default=0.0, metavar="P",
        help=f"label an image whose top probability is below P as '{UNKNOWN}' (counted wrong)")
    add("--device", default="auto", help=cli.DEVICE_HELP)
    add("--batch-size", type=cli.positive_int, default=256, help="images per forward pass")
    add("--limit", type=cli.positive_int, default=None,
        help="predict only this many images (stratified sample; default: all)")
    return parser


def main(argv: list[str] | None = None) -> None:
    cli.guard_output(whole=True)
    # Paths between and after the flags too (`a.png --topk 3 b.png`, which `invoke predict --paths b.png -- a.png
    # --topk 3` runs): parse_intermixed_args', but a path after `--` alone is no error.
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    before, after = (rest[:rest.index("--")], rest[rest.index("--") + 1:]) if "--" in rest else (rest, [])
    if flags := [word for word in before if word.startswith("-") and word != "-"]:
        parser.error(f"unrecognized arguments: {' '.join(flags)}")
    args.paths += before + after
    sys.exit(cli.report_errors("predict.py", args.batch_size, lambda: predict(args)))


if __name__ == "__main__":
    cli.run_script(main)
