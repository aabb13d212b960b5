"""Classify images with a trained checkpoint.

    python predict.py img.png photos/ --topk 3
    python predict.py data/cifar10/test --limit 64 --grid predictions.png

Each image is brought to the resolution the model's training images were
stored at, then given the evaluation transform, exactly as in evaluation.
A folder whose sub-folders are the checkpoint's classes is treated as labelled:
accuracy, per-class accuracy and the confusion matrix are printed too (images
in its other sub-folders are predicted unlabelled, and a line says so).
"""
import argparse
import functools
import json
import logging
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from torch.export.passes import move_to_device_pass
from torchvision.utils import make_grid

import cli
import data
from model import (CheckpointError, check_checkpoint_file, is_exported_program, load_checkpoint,
                   model_from_checkpoint)

DEFAULT_CHECKPOINTS = ("checkpoints/finetune.pt", "checkpoints/pretrain.pt")
GRID_TILE = 96  # px per image in the --grid picture
GRID_MAX = 64  # images drawn at most
PROGRAM_RECORD = "export.json"  # in an exported program's file (export.py): classes, sizes, where it came from
MATRIX_WIDTH = 120  # characters: a wider confusion matrix is printed as its most confused pairs


# --------------------------------------------------------------------------- the evaluation path

@torch.no_grad()
def compute_logits(model: nn.Module, batches: Iterable[torch.Tensor], image_size: int, flip: bool = False,
                   title: str | None = None, total: int = 0) -> torch.Tensor:
    """Centre crop on the device, batch by batch (uint8 images, see data.ImageSet.batches), in fp32; training's
    validation and test use it too.

    With `flip` (--tta) the logits are the mean over the crop and its mirror image.
    With a `title` it shows its progress over `total` images (see cli.ProgressLine).
    """
    return torch.cat(list(logits_of_batches(model, batches, image_size, flip, title, total)))


@torch.no_grad()
def logits_of_batches(model: nn.Module, batches: Iterable[torch.Tensor], image_size: int, flip: bool = False,
                      title: str | None = None, total: int = 0) -> Iterator[torch.Tensor]:
    """compute_logits, one batch's logits at a time, for a caller that uses each as it comes."""
    model.eval()
    line = None if title is None else cli.ProgressLine(title, total)
    done = 0
    for images in batches:
        logits = logits_of(model, images, image_size, flip)
        done += len(images)
        if line is not None and line.due(done):
            line.show(done)
        yield logits
    if line is not None:
        line.close()


def logits_of(model: nn.Module, images: torch.Tensor, image_size: int, flip: bool = False) -> torch.Tensor:
    """One batch of uint8 images through the evaluation transform and the model (in eval mode), fp32 logits; also
    the body of export.py's program."""
    x = data.eval_batch(images, image_size)
    logits = model(x).float()
    if flip:
        logits = (logits + model(x.flip(3)).float()) / 2
    return logits


def classification_report(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    """Accuracy, loss, per-class accuracy and the confusion matrix, as plain numbers."""
    labels = labels.to(logits.device)
    confusion = torch.zeros(len(classes), len(classes), dtype=torch.int64)
    ones = torch.ones(len(labels), dtype=torch.int64)
    confusion.index_put_((labels.cpu(), logits.argmax(1).cpu()), ones, accumulate=True)
    counts = confusion.sum(1)
    per_class, seen = (confusion.diag() / counts.clamp(min=1)).tolist(), (counts > 0).tolist()
    return {
        "images": len(labels),
        "loss": F.cross_entropy(logits, labels).item(),
        "accuracy": (confusion.diag().sum() / len(labels)).item(),
        # None (JSON null) for a class without images: 0 would read as "all of them wrong".
        "per_class_accuracy": {name: per_class[i] if seen[i] else None for i, name in enumerate(classes)},
        "confusion_matrix": confusion.tolist(),  # rows: true class, columns: predicted
    }


def print_report(title: str, report: dict, classes: list[str]) -> None:
    print(f"{title}: accuracy {report['accuracy']:.2%} on {report['images']} images, loss {report['loss']:.4f}")
    classes = [cli.printable(name) for name in classes]  # a newline in a class folder's name would split a row
    width = max(len(name) for name in classes)
    for name, accuracy in zip(classes, report["per_class_accuracy"].values()):
        print(f"  {name:>{width}}  " + ("n/a (no images)" if accuracy is None else f"{accuracy:7.2%}"))
    if width + 2 + 6 * len(classes) > MATRIX_WIDTH:
        print_most_confused(report["confusion_matrix"], classes)
        return
    print("confusion matrix (rows: true, columns: predicted):")
    print(" " * (width + 2) + " ".join(f"{name[:5]:>5}" for name in classes))
    for name, row in zip(classes, report["confusion_matrix"]):
        print(f"  {name:>{width}}" + " ".join(f"{count:5d}" for count in row))


def print_most_confused(confusion: list[list[int]], classes: list[str], shown: int = 10) -> None:
    """Instead of a matrix wider than a terminal: the pairs of classes most often mistaken, the true one first."""
    pairs = sorted((-count, true, predicted) for true, row in enumerate(confusion)
                   for predicted, count in enumerate(row) if true != predicted and count)
    print(f"most confused pairs ({min(shown, len(pairs))} of {len(pairs)}; the full matrix is in the JSON report: "
          "predict.py --json, a training run's .test.json):")
    for count, true, predicted in pairs[:shown]:
        print(f"  {classes[true]} taken for {classes[predicted]}: {-count}")


# --------------------------------------------------------------------------- command-line plumbing


# --------------------------------------------------------------------------- prediction


def find_images(paths: list[str], classes: list[str]) -> tuple[list[tuple[Path, int | None]], list[str]]:
    """Files to predict with their true class index when known (see folder_images), and one error line per bad path."""
    found, errors = [], []
    for name in paths:
        path = Path(name)
        if not name:  # Path("") is the current folder
            errors.append("'': an empty path; pass image files or folders")
        elif path.is_file():
            found.append((path, None))
        elif path.is_dir():
            try:
                images = folder_images(path, classes)
            except cli.DataError as e:
                errors.append(str(e))
                continue
            if not images:
                errors.append(f"{cli.shown(path)}: no images in this folder ({', '.join(data.IMAGE_EXTENSIONS)})")
            found += images
        elif path.exists():  # a device, FIFO or socket: reading it would never end, or wait for a writer
            kind = cli.special_kind(path.stat().st_mode)
            errors.append(f"{cli.shown(path)}: {kind}, not an image file or a folder; pass image files or folders")
        elif data.URL.match(name):
            errors.append(f"{name}: a URL; predict.py reads local files: download it first (e.g. curl -O {name})")
        else:
            errors.append(f"{cli.shown(path)}: no such file or folder; check the path")
    return once_each(found), errors


def once_each(found: list[tuple[Path, int | None]]) -> list[tuple[Path, int | None]]:
    """Each image once, however often the paths name it (`d/test d/test`, a folder and a file in it): twice would
    count it twice in the accuracy. Its first name is kept, with a label when any of its names gives one."""
    kept: dict[Path, tuple[Path, int | None]] = {}
    for path, label in found:
        key = path.resolve()
        first, first_label = kept.get(key, (path, None))
        kept[key] = (first, label if first_label is None else first_label)
    if len(kept) < len(found):
        print(f"predict.py: note: {len(found) - len(kept)} image(s) named more than once by the paths given: each is "
              "predicted once", file=sys.stderr)
    return list(kept.values())


def folder_images(path: Path, classes: list[str]) -> list[tuple[Path, int | None]]:
    """A folder's images, labelled by the class folder they lie in when its sub-folders include the checkpoint's
    classes; the images in other sub-folders are predicted unlabelled, which a line on stderr says."""
    try:
        folders = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except OSError as e:  # an unreadable folder is that path's error line; the other paths are still predicted
        raise cli.DataError(f"{cli.shown(path)}: cannot read this folder ({e.strerror or e})",
                             "check its permissions") from None
    labelled = any(p.name in classes for p in folders)
    others = sorted(cli.shown(p.name) for p in folders if p.name not in classes)
    if labelled and others:
        print(f"predict.py: note: {cli.shown(path)}: {len(others)} sub-folder(s) named like no class of the "
              f"checkpoint ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}): their images are "
              "predicted unlabelled, the class folders' with their labels", file=sys.stderr)
    elif not labelled and any((path / "test" / name).is_dir() for name in classes):
        print(f"predict.py: note: {cli.shown(path)} is a data folder (train/, test/): its images are predicted "
              f"unlabelled; pass {cli.shown(path / 'test')} for the test split's accuracy", file=sys.stderr)
    return [(p, class_of(p.relative_to(path), classes) if labelled else None) for p in data.image_files(path)]


def class_of(relative: Path, classes: list[str]) -> int | None:
    """The class folder an image lies in; one beside the class folders, or in a hidden folder, has none."""
    first = relative.parts[0]
    return classes.index(first) if len(relative.parts) > 1 and first in classes else None


def load_classifier(path: str, device: torch.device) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict]:
    """A checkpoint, or a program export.py wrote, as a function from uint8 images at the stored size to logits on
    `device`, and what describes it (classes, stored_size: the checkpoint, or the record in the program's file)."""
    check_checkpoint_file(path)
    if not is_exported_program(path):
        checkpoint = load_checkpoint(path)
        model = model_from_checkpoint(checkpoint, path).to(device).eval()
        return functools.partial(logits_of, model, image_size=checkpoint["image_size"],
                                 flip=checkpoint.get("tta", False)), checkpoint
    program, about = load_program(path)
    return functools.partial(log_probabilities, move_to_device_pass(program, device).module()), about


def load_program(path: str) -> tuple[torch.export.ExportedProgram, dict]:
    """A program export.py wrote, and the record it holds (PROGRAM_RECORD); anything else is one line."""
    check_checkpoint_file(path)
    if not is_exported_program(path):
        raise CheckpointError(f"{path}: not an exported program; pass a file export.py wrote, or export this "
                              f"checkpoint first: python export.py --checkpoint {path}")
    record = {PROGRAM_RECORD: ""}
    torch_log = logging.getLogger("torch.export")  # it logs a traceback before it raises: the line below says it
    torch_log.disabled = True
    try:
        program = torch.export.load(path, extra_files=record)
        about = json.loads(record[PROGRAM_RECORD])
    except Exception:  # noqa: BLE001 - torch raises many types for a damaged or foreign archive
        raise CheckpointError(f"{path}: an exported program that cannot be loaded (damaged, or without "
                              f"{PROGRAM_RECORD}: not written by export.py); export it again") from None
    finally:
        torch_log.disabled = False
    return program, about


def log_probabilities(program: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """A program's probabilities as logits: softmax gives them back, and the loss is the same (a probability that
    underflowed to 0 as the smallest float, not as -inf: an infinite loss)."""
    return program(images).clamp_min(torch.finfo(torch.float32).tiny).log()


def default_checkpoint() -> str:
    for path in DEFAULT_CHECKPOINTS:
        if Path(path).is_file():
            return path
    raise CheckpointError(f"no checkpoint given and none of {', '.join(DEFAULT_CHECKPOINTS)} exists; "
                          "train first (invoke all, or python pretrain.py) or pass --checkpoint")


def draw_grid(path: str, images: torch.Tensor, predicted: list[str], true: list[str | None]) -> None:
    """Tiles of the images with the predicted label under each (green right, red wrong, white unknown)."""
    font = ImageFont.load_default()
    tiles = []
    for image, guess, label in zip(images, predicted, true):
        tile = Image.new("RGB", (GRID_TILE, GRID_TILE + 14), "black")
        tile.paste(Image.fromarray(image.permute(1, 2, 0).numpy()).resize((GRID_TILE, GRID_TILE), Image.NEAREST))
        colour = "white" if label is None else ("lime" if label == guess else "red")
        text = guess if label is None or label == guess else f"{guess} ({label})"
        ImageDraw.Draw(tile).text((2, GRID_TILE + 1), text, fill=colour, font=font)
        tiles.append(torch.from_numpy(np.array(tile)).permute(2, 0, 1))
    grid = make_grid(torch.stack(tiles), nrow=8, padding=2)
    cli.save_picture(Image.fromarray(grid.permute(1, 2, 0).numpy()), Path(path))


def read_images(found: list[tuple[Path, int | None]], size: int, errors: list[str]
                ) -> tuple[torch.Tensor | None, list[int]]:
    """Decode each file as the training cache was built, and say which were read; an unreadable one adds a line to
    `errors` and is printed to stderr at once."""
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


def top_classes(logits: torch.Tensor, kept: list[tuple[Path, int | None]], classes: list[str], k: int) -> list[dict]:
    """Per image: its path, its true class when known, and the k most probable classes."""
    top = torch.softmax(logits, 1).topk(min(k, len(classes)), dim=1)
    results = []
    for (path, label), probabilities, indices in zip(kept, top.values.tolist(), top.indices.tolist()):
        results.append({"path": cli.shown(path), "true": None if label is None else classes[label],
                        "top": [{"label": classes[i], "probability": p} for p, i in zip(probabilities, indices)]})
    return results


def check_grid_path(grid: str) -> None:
    """--grid is checked before any prediction, not after: a picture file Pillow can write, in a writable folder."""
    path = Path(grid)
    if not path.is_dir() and Image.registered_extensions().get(path.suffix.lower()) not in Image.SAVE:
        raise cli.UsageError(f"--grid {grid}: Pillow cannot write a picture named like this; end it in .png or .jpg")
    cli.check_writable_file("--grid", path, "predictions.png", "a picture file")


def check_grid_not_input(grid: str, found: list[tuple[Path, int | None]]) -> None:
    """The grid would overwrite an image it is about to show: refused before predicting."""
    target = Path(grid).resolve()
    if any(path.resolve() == target for path, _ in found):
        raise cli.UsageError(f"--grid {grid}: is one of the images to predict, and writing the grid would overwrite it; "
                         "choose another path")


def predict(args: argparse.Namespace) -> int:
    if args.grid == "":  # `if args.grid` would draw no grid without a word
        raise cli.UsageError("--grid is empty; pass a picture file, or leave the flag out for no grid")
    if args.grid:
        check_grid_path(args.grid)
    if args.checkpoint == "":  # `or` would fall back to the default checkpoints without a word
        raise cli.UsageError("--checkpoint is empty; pass a checkpoint file, or leave the flag out to use "
                         f"the first of {', '.join(DEFAULT_CHECKPOINTS)} that exists")
    checkpoint_path = args.checkpoint or default_checkpoint()
    device = cli.resolve_device(args.device)
    classify, checkpoint = load_classifier(checkpoint_path, device)
    classes = checkpoint["classes"]

    found, errors = find_images(args.paths, classes)
    if args.grid:
        check_grid_not_input(args.grid, found)
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
    report = None
    if done.labels:
        report = classification_report(torch.cat(done.logits), torch.tensor(done.labels), classes)
    if args.json:
        print(json.dumps({"checkpoint": checkpoint_path, "predictions": done.results, "report": report,
                          "errors": errors}, indent=1))
    elif report is not None:
        print_report(f"{len(done.labels)} labelled images", report, classes)
    if args.grid:  # also when stdout is closed (`| head`): the picture was asked for as well
        draw_grid(args.grid, torch.stack(done.tiles), [done.results[i]["top"][0]["label"] for i in done.tiled],
                  [done.results[i]["true"] for i in done.tiled])
        print(f"wrote {args.grid} ({len(done.tiles)} images)", file=sys.stderr)
    check_results_written()
    return 1 if errors else 0


@dataclass
class Predicted:
    """What a pass over the images keeps: a small result per image, the logits of the labelled ones (for the
    report), and the few images the --grid picture shows (`tiled`: their results); never all the images."""
    results: list[dict] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    tiles: list[torch.Tensor] = field(default_factory=list)
    tiled: list[int] = field(default_factory=list)


@torch.no_grad()
def predict_in_batches(classify: Callable[[torch.Tensor], torch.Tensor], found: list[tuple[Path, int | None]],
                       checkpoint: dict, args: argparse.Namespace, device: torch.device, errors: list[str]
                       ) -> Predicted:
    """Decode and predict (`classify`: see load_classifier) --batch-size images at a time, each image's line printed
    as it comes (an unreadable file's error too): a folder of any size predicts in bounded memory. --grid shows up to
    GRID_MAX images spread evenly over the files."""
    done = Predicted()
    grid = set(torch.linspace(0, len(found) - 1, min(GRID_MAX, len(found))).round().long().tolist() if args.grid
               else [])
    line = None if args.json or not found else cli.ProgressLine("predict", len(found), stream=sys.stderr)
    for start in range(0, len(found), args.batch_size):
        batch = found[start:start + args.batch_size]
        images, kept = read_images(batch, checkpoint["stored_size"], errors)
        if images is not None:
            logits = classify(images.to(device)).cpu()
            results = top_classes(logits, [batch[i] for i in kept], checkpoint["classes"], args.topk)
            labelled = [j for j, i in enumerate(kept) if batch[i][1] is not None]
            done.logits.append(logits[labelled])
            done.labels += [batch[kept[j]][1] for j in labelled]
            for j, i in enumerate(kept):
                if start + i in grid:
                    done.tiles.append(images[j].clone())  # a view would keep its whole batch
                    done.tiled.append(len(done.results) + j)
            done.results += results
            if not args.json:  # names escaped (cli.printable): a tab or newline in one would split its line
                print("".join(r["path"] + "".join(f"\t{cli.printable(t['label'])}\t{t['probability']:.4f}"
                                                  for t in r["top"]) + "\n" for r in results), end="", flush=True)
        if line is not None and line.due(start + len(batch)):
            line.show(start + len(batch))
    if line is not None:
        line.close()
    return done


def check_results_written() -> None:
    """stdout closed early (`| head`) ends predict quietly, as Unix tools do: with 128 + SIGPIPE, as if killed by it.

    Any other failure to write them (a full disk) is one line; they were written whole or not at all (cli.Output).
    """
    sys.stdout.flush()
    lost = getattr(sys.stdout, "lost", None)
    if isinstance(lost, BrokenPipeError):
        sys.exit(128 + getattr(signal, "SIGPIPE", 13))  # 13 wherever there is one; Windows has none
    if lost is not None:
        raise cli.UsageError(f"cannot write the results to stdout ({lost.strerror or lost}); none were kept: free space, "
                         "or send them elsewhere")


def build_parser() -> argparse.ArgumentParser:
    """predict.py's flags, also the `invoke predict` task's."""
    parser = cli.ArgumentParser(__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("paths", nargs="+", metavar="IMAGE_OR_DIR", help="image files and folders of images")
    add("--checkpoint", default=None, help=f"default: the first of {', '.join(DEFAULT_CHECKPOINTS)} that exists")
    add("--topk", type=cli.positive_int, default=1, help="how many classes to show per image")
    add("--json", action="store_true", help="print JSON instead of lines")
    add("--grid", default=None, metavar="PATH",
        help=f"also draw up to {GRID_MAX} images with their labels here (default: none)")
    add("--device", default="auto", help=cli.DEVICE_HELP)
    add("--batch-size", type=cli.positive_int, default=256, help="images per forward pass")
    add("--limit", type=cli.positive_int, default=None,
        help="predict only this many images (stratified sample; default: all)")
    return parser


def main(argv: list[str] | None = None) -> None:
    cli.guard_output(whole=True)
    args = build_parser().parse_args(argv)
    sys.exit(cli.report_errors("predict.py", args.batch_size, lambda: predict(args)))


if __name__ == "__main__":
    main()
