"""Classify images with a trained checkpoint.

    python predict.py img.png photos/ --topk 3
    python predict.py data/cifar10/test --limit 64 --grid predictions.png

Each image is brought to the resolution the model's training images were
stored at, then given the evaluation transform, exactly as in evaluation.
A folder whose sub-folders are the checkpoint's classes is treated as labelled:
accuracy, per-class accuracy and the confusion matrix are printed too.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

import data
from model import CheckpointError, load_checkpoint, model_from_checkpoint, resolve_device
from pretrain import classification_report, compute_logits, positive_int, print_report, report_errors

DEFAULT_CHECKPOINTS = ("checkpoints/finetune.pt", "checkpoints/pretrain.pt")
GRID_TILE = 96  # px per image in the --grid picture
GRID_MAX = 64  # images drawn at most


def find_images(paths: list[str], classes: list[str]) -> tuple[list[tuple[Path, int | None]], list[str]]:
    """Files to predict with their true class index when known, and one error line per bad path.

    A folder whose sub-folders all carry names of the checkpoint's classes gives
    its images those labels; any other folder is searched for images, unlabelled.
    """
    found, errors = [], []
    for name in paths:
        path = Path(name)
        if path.is_file():
            found.append((path, None))
        elif path.is_dir():
            folders = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
            labelled = bool(folders) and all(p.name in classes for p in folders)
            images = sorted(p for p in path.rglob("*") if data.is_image_file(p) and p.is_file())
            if not images:
                errors.append(f"{path}: no images in this folder ({', '.join(data.IMAGE_EXTENSIONS)})")
            found += [(p, classes.index(p.relative_to(path).parts[0]) if labelled else None) for p in images]
        else:
            errors.append(f"{path}: no such file or folder")
    return found, errors


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
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


def predict(args: argparse.Namespace) -> int:
    checkpoint_path = args.checkpoint or default_checkpoint()
    checkpoint = load_checkpoint(checkpoint_path)
    model = model_from_checkpoint(checkpoint, checkpoint_path)
    device = resolve_device(args.device)
    classes, size = checkpoint["classes"], checkpoint["stored_size"]

    found, errors = find_images(args.paths, classes)
    if args.limit is not None and args.limit < len(found):
        labels = torch.tensor([-1 if label is None else label for _, label in found]) + 1
        found = [found[i] for i in data.stratified_split(labels, args.limit, seed=0)[0]]
    decoded, kept = [], []
    for path, label in found:
        try:
            decoded.append(torch.from_numpy(data.decode(path, size)[0]).permute(2, 0, 1))
            kept.append((path, label))
        except data.UserError as e:
            errors.append(str(e))
    for line in errors:
        print(f"predict.py: {line}", file=sys.stderr)
    if not kept:
        print("predict.py: no image could be read; pass image files or folders of images", file=sys.stderr)
        return 1

    images = torch.stack(decoded)
    logits = compute_logits(model.to(device), images.to(device), checkpoint["image_size"], args.batch_size,
                            checkpoint.get("tta", False)).cpu()
    top = torch.softmax(logits, 1).topk(min(args.topk, len(classes)), dim=1)
    results = [{"path": str(path), "true": None if label is None else classes[label],
                "top": [{"label": classes[i], "probability": p} for p, i in zip(probs.tolist(), indices.tolist())]}
               for (path, label), probs, indices in zip(kept, top.values, top.indices)]
    labelled = all(label is not None for _, label in kept)
    report = classification_report(logits, torch.tensor([label for _, label in kept]), classes) if labelled else None

    if args.json:
        print(json.dumps({"checkpoint": checkpoint_path, "predictions": results, "report": report, "errors": errors}, indent=1))
    else:
        for result in results:
            print(str(result["path"]) + "".join(f"\t{t['label']}\t{t['probability']:.4f}" for t in result["top"]))
        if report is not None:
            print_report(f"{len(kept)} labelled images", report, classes)
    if args.grid:
        show = torch.linspace(0, len(kept) - 1, min(GRID_MAX, len(kept))).round().long().unique()
        draw_grid(args.grid, images[show], [results[i]["top"][0]["label"] for i in show], [results[i]["true"] for i in show])
        print(f"wrote {args.grid} ({len(show)} images)", file=sys.stderr if args.json else sys.stdout)
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=data.HelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("paths", nargs="+", metavar="IMAGE_OR_DIR", help="image files and folders of images")
    parser.add_argument("--checkpoint", default=None, help=f"default: the first of {', '.join(DEFAULT_CHECKPOINTS)} that exists")
    parser.add_argument("--topk", type=positive_int, default=1, help="how many classes to show per image")
    parser.add_argument("--json", action="store_true", help="print JSON instead of lines")
    parser.add_argument("--grid", default=None, metavar="PATH", help=f"also draw up to {GRID_MAX} images with their labels here (default: none)")
    parser.add_argument("--device", default=None, help="cuda, cpu ... (default: cuda if available, else cpu)")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="images per forward pass")
    parser.add_argument("--limit", type=positive_int, default=None, help="predict only this many images (stratified sample; default: all)")
    args = parser.parse_args(argv)
    sys.exit(report_errors("predict.py", args, lambda: predict(args)))


if __name__ == "__main__":
    main()
