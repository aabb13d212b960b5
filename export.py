"""Export a checkpoint as a program that runs without this project: uint8 images in, probabilities out.

    python export.py --checkpoint checkpoints/finetune.pt --out model.pt2

The program (torch.export) holds the weights and predict.py's evaluation path (resize, centre crop, normalisation,
--tta's mirror-image average, the calibrated temperature). It takes N x 3 x S x S uint8 images, S the checkpoint's
stored size (shorter side resized to S, centre cropped, as data.decode does), and returns N x classes
probabilities; it loads with torch.export.load where torch is installed, the class names in its file.

Before it is written, the program (saved and loaded back) and the checkpoint (through predict.py) run on the same
images, the checkpoint's test split or generated ones: unless their top-1 classes agree on every image and their
probabilities differ by less than TOLERANCE, nothing is written. The figures go beside it (model.pt2.json).
"""
import signal

if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a Ctrl-C while torch loads: killed quietly (then cli.run_script's)

import argparse
import io
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

import cli
import data
import predict
from model import CheckpointError, is_exported_program, model_from_checkpoint, recorded_path

TOLERANCE = 1e-4  # the largest probability difference allowed between the program and the checkpoint, in fp32
GENERATED_IMAGES = 64  # checked when there is no test split


class Deployed(nn.Module):
    """What the program computes from a checkpoint: predict.py's evaluation path, then softmax(logits / temperature)."""

    def __init__(self, checkpoint: dict, path: str) -> None:
        super().__init__()
        # frozen: a program of trainable weights returns probabilities that require grad, each call keeping the
        # batch's autograd graph (1.7x the peak memory at batch 1024) and refusing .numpy()
        self.model = model_from_checkpoint(checkpoint, path).eval().requires_grad_(False)
        self.evaluation = predict.evaluation_of(checkpoint)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(predict.logits_of(self.model, images, **self.evaluation), 1)


def export_program(module: Deployed, stored_size: int, device: torch.device) -> torch.export.ExportedProgram:
    example = torch.zeros(2, 3, stored_size, stored_size, dtype=torch.uint8, device=device)
    with torch.no_grad():
        return torch.export.export(module, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))


def check_images(checkpoint: dict, data_dir: str | None, limit: int | None) -> tuple[data.ImageSet, str]:
    """The images both are run on, and what they are: the test split of --data-dir (default: the checkpoint's data
    folder, where it still holds one), else GENERATED_IMAGES seeded noise images."""
    recorded = checkpoint.get("args", {}).get("data_dir")
    candidates = (recorded_path(checkpoint, recorded), recorded) if recorded else ()  # else here: a copied checkpoint
    folder = data_dir or next((path for path in candidates if (Path(path) / "test").is_dir()), None)
    size = checkpoint["stored_size"]
    if folder is not None:
        test = data.load_folder(Path(folder) / "test", size=size)
        if limit is not None and limit < len(test):
            test = test.subset(data.stratified_split(test.labels, limit, seed=0)[0])
        return test, f"the test split of {cli.shown(folder)}"
    count = min(limit or GENERATED_IMAGES, GENERATED_IMAGES)
    images = torch.randint(256, (count, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return (data.ImageSet(images, torch.zeros(count, dtype=torch.int64), checkpoint["classes"]),
            "generated images (no test split found; pass --data-dir for real ones)")


@torch.no_grad()
def agreement(program: nn.Module, reference: nn.Module, images: data.ImageSet, batch_size: int,
              device: torch.device) -> dict:
    """Both run batch by batch: the share of images whose top-1 class they agree on, the largest probability gap.
    Its progress shown: CIFAR-10's test split takes a minute and a half on 2 CPU cores, else without a word."""
    same, largest, done = 0, 0.0, 0
    line = cli.ProgressLine("check", len(images))
    for batch, _ in images.batches(None, 0, batch_size):
        batch = batch.to(device)
        exported, eager = program(batch), reference(batch)
        same += int((exported.argmax(1) == eager.argmax(1)).sum())
        largest = max(largest, float((exported - eager).abs().max()))
        done += len(batch)
        if line.due(done):
            line.show(done)
    line.close()
    return {"images": len(images), "top1_agreement": same / len(images), "max_probability_difference": largest,
            "tolerance": TOLERANCE}


def write_program(path: Path, program: bytes, record: dict) -> None:
    """The program, then its record beside it, each written whole or not at all (cli.write_atomically)."""
    beside = Path(f"{path}.json")
    try:
        cli.write_atomically(path, lambda f: f.write(program))
    except OSError as e:  # the previous program and record, if any, are as they were
        raise cli.UsageError(f"--out {path}: cannot write ({e.strerror or e}); free space or choose another "
                             "path") from None
    try:
        cli.write_atomically(beside, lambda f: f.write(json.dumps(record, indent=1).encode() + b"\n"))
    except OSError as e:
        beside.unlink(missing_ok=True)  # a previous record would describe another program; this one holds its own
        raise cli.UsageError(f"--out {path}: written, but not its record {beside} ({e.strerror or e}); free "
                             "space and export again") from None


def check_out(out: Path) -> None:
    """Before the long work: --out a .pt2 file in a folder that exists and can be written, replacing no file but a
    program (a checkpoint, a run's resume state, a picture stay), nor a file where its record goes but the program's
    own."""
    cli.check_writable_file("--out", out, "model.pt2", "a program file")
    if not out.parent.is_dir():
        raise cli.UsageError(f"--out {cli.shown(out)}: folder {cli.shown(out.parent)} does not exist; create it or "
                             "choose another --out")
    program = out.is_file() and is_exported_program(out)
    if out.is_file() and not program:
        raise cli.UsageError(f"--out {cli.shown(out)}: exists and is no exported program (a checkpoint?), which "
                             "writing would replace; choose another --out, or remove the file")
    record = Path(f"{out}.json")
    if record.exists() and not (program and is_record(record)):  # a program's own record is replaced
        raise cli.UsageError(f"--out {cli.shown(out)}: its record {cli.shown(record)} would replace what is there, "
                             "which is no record of a program at --out; remove it or choose another --out")
    if not out.name.endswith(".pt2"):  # torch's own test of a path, the program's users' torch.export.load(path)
        raise cli.UsageError(f"--out {cli.shown(out)}: a program file's name ends in .pt2 (torch.export.load warns of "
                             f"any other, and is to refuse it); choose e.g. --out {cli.shown(out.with_suffix('.pt2'))}")


def is_record(path: Path) -> bool:
    """Whether `path` is a record export.py wrote (JSON naming a checkpoint and the check), not a user's file."""
    try:
        return {"checkpoint", "check"} <= set(json.loads(path.read_bytes()))
    except (OSError, ValueError, TypeError):  # a folder, no JSON, JSON that is no object
        return False


def export(args: argparse.Namespace) -> None:
    out = Path(args.out)
    check_out(out)
    if args.data_dir is not None and not (Path(args.data_dir) / "test").is_dir():  # before the work, as --out
        raise cli.UsageError(f"--data-dir {cli.shown(args.data_dir)}: holds no test/ folder; pass the data folder "
                             "whose test/ holds the class folders (e.g. data/cifar10)")
    device = cli.resolve_device(args.device)
    args.checkpoint = predict.checkpoint_given(args.checkpoint, "export.py")
    checkpoint = predict.load_trained(args.checkpoint)
    reference = Deployed(checkpoint, args.checkpoint).to(device)
    size = checkpoint["stored_size"]
    record = {"checkpoint": str(args.checkpoint), "checkpoint_code": checkpoint.get("code"), "code": cli.code_version(),
              "torch": torch.__version__, "device": str(device), "input": f"N x 3 x {size} x {size} uint8",
              "output": f"N x {len(checkpoint['classes'])} probabilities", "classes": checkpoint["classes"],
              "stored_size": size, **reference.evaluation, "mean": list(data.MEAN), "std": list(data.STD)}
    started = time.perf_counter()
    buffer = io.BytesIO()  # the program's file, its record in it
    torch.export.save(export_program(reference, size, device), buffer,
                      extra_files={predict.PROGRAM_RECORD: json.dumps(record)})
    program = buffer.getvalue()
    seconds = time.perf_counter() - started
    loaded = predict.load_exported(io.BytesIO(program)).module()  # checked as it will be loaded
    images, source = check_images(checkpoint, args.data_dir, args.limit)
    check = agreement(loaded, reference, images, args.batch_size, device) | {"source": source}
    print(f"{cli.shown(args.checkpoint)} -> {cli.shown(out)} on {check['images']} images ({source}): top-1 agreement "
          f"{check['top1_agreement']:.2%}, largest probability difference {check['max_probability_difference']:.2e}")
    if check["top1_agreement"] < 1 or not check["max_probability_difference"] < TOLERANCE:
        raise CheckpointError(f"{args.checkpoint}: the exported program differs from the checkpoint (needs top-1 "
                              f"agreement 100% and a difference below {TOLERANCE}); nothing written: report it "
                              "with torch's version")
    write_program(out, program, record | {"check": check, "export_seconds": round(seconds, 2)})
    print(f"wrote {cli.shown(out)} ({len(program) / 1e6:.1f} MB, exported in {seconds:.1f} s) and its record "
          f"{cli.shown(out)}.json", file=sys.stderr)
    cli.say_if_stdout_lost("export.py", f"its lines are lost, the agreement's figures are in the record "
                           f"{cli.shown(out)}.json")


def build_parser() -> argparse.ArgumentParser:
    """export.py's flags, also the `invoke export` task's."""
    parser = cli.ArgumentParser(__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--checkpoint", default=None, help=f"the checkpoint to export (default: {predict.DEFAULT_RULE})")
    add("--out", default="model.pt2", help="the program file, named *.pt2; its record is written beside it (OUT.json)")
    add("--device", default="cpu", help="cuda, cpu ...: the device the program runs on, and is checked on")
    add("--data-dir", default=None,
        help="data folder whose test/ the check runs on (default: the checkpoint's, else generated images)")
    add("--limit", type=cli.positive_int, default=None,
        help=f"check only this many images (a stratified sample of the test split; at most {GENERATED_IMAGES} "
             "generated)")
    add("--batch-size", type=cli.positive_int, default=256, help="images per forward pass of the check")
    return parser


def main(argv: list[str] | None = None) -> None:
    cli.guard_output()  # stdout closed (`| head`) does not stop the export: the program is its result
    args = build_parser().parse_args(argv)
    cli.report_errors("export.py", args.batch_size, lambda: export(args))


if __name__ == "__main__":
    cli.run_script(main)
