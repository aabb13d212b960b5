"""Transfer a trained AlexNet to a class-folder data set: train its last layer (or more) there.

    python finetune.py                        # CIFAR-10 again: all frozen, the head trains on
    python finetune.py --new-head             # the reference: all frozen, a fresh head
    python finetune.py --data-dir my_photos --mode full --checkpoint checkpoints/pretrain.pt

The data set may have any classes: the head is new unless they are the checkpoint's (see new_model).
"""
import signal

if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a Ctrl-C while torch loads: killed quietly (then cli.run_script's)

import argparse
import contextlib
import functools
import hashlib
import os
import sys
from pathlib import Path

import torch
from torch import nn

from cli import UsageError, guard_output, report_errors, run_script
from data import ImageSet
from model import AlexNet, load_checkpoint, model_from_checkpoint, recorded_path
from pretrain import make_parser, parse_flags, side_files, train

TRAINED_PARTS = {"head": ("classifier.6.",), "classifier": ("classifier.",), "full": ("",)}
# Flags that choose the validation split; the checkpoint's run trained on what its own split left.
SPLIT_FLAGS = ("seed", "val_size", "limit")


def warn_if_validation_was_trained_on(args: argparse.Namespace, checkpoint: dict, images: ImageSet) -> None:
    """Same data folder, another split: some validation images trained the checkpoint, so validation flatters it.
    A folder changed since (images added, removed or modified) has its split drawn anew."""
    if not same_data_folder(args, checkpoint):
        return
    values = [(name, getattr(args, name), checkpoint["args"].get(name)) for name in SPLIT_FLAGS]
    differing = [f"--{name.replace('_', '-')} {'default' if now is None else now} (the checkpoint's run: "
                 f"{'default' if then is None else then})" for name, now, then in values if now != then]
    if checkpoint.get("data_fingerprint") not in (None, images.fingerprint):  # None: not kept by an older checkpoint
        differing.append(f"{args.data_dir}/train changed since its run (images added, removed or modified)")
    if differing:
        print(f"finetune.py: warning: {', '.join(differing)}: this validation split holds images {args.checkpoint} "
              "trained on, so validation accuracy is optimistic and may pick the wrong epoch; the test split is "
              "unaffected. Use the checkpoint's values and images to avoid it", file=sys.stderr)


def same_data_folder(args: argparse.Namespace, checkpoint: dict) -> bool:
    """Whether --data-dir is the folder the checkpoint's run trained on, by real path (relative, absolute and linked
    names are one folder); its relative --data-dir is in the folder its run started in (old checkpoints: this one)."""
    source = checkpoint.get("args", {})
    return "data_dir" in source and (os.path.realpath(recorded_path(checkpoint, source["data_dir"]))
                                     == os.path.realpath(args.data_dir))


def new_model(args: argparse.Namespace, images: ImageSet, checkpoint: dict) -> tuple[AlexNet, bool]:
    """The checkpoint's model; its head is kept for the checkpoint's own classes (unless --new-head). Only then do
    the starting weights compete as epoch 0: a new head is random, no model of these classes."""
    model = model_from_checkpoint(checkpoint, args.checkpoint)
    if new_head := args.new_head or checkpoint["classes"] != images.classes:
        model.classifier[6] = nn.Linear(model.classifier[6].in_features, len(images.classes))
    else:
        print(f"{args.checkpoint} has this data set's classes: the head starts from its weights "
              "(--new-head: a fresh one)")
    warn_if_validation_was_trained_on(args, checkpoint, images)
    return model, not new_head


def trainable(args: argparse.Namespace, model: AlexNet) -> list[nn.Parameter]:
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(TRAINED_PARTS[args.mode]))
    return [p for p in model.parameters() if p.requires_grad]


def build_parser() -> argparse.ArgumentParser:
    """finetune.py's flags, also the `invoke finetune` task's."""
    parser = make_parser(__doc__.split("\n\n")[0], "finetune")
    parser.add_argument("--checkpoint", default="checkpoints/pretrain.pt", help="the trained model to start from")
    parser.add_argument("--mode", choices=sorted(TRAINED_PARTS), default="head",
                        help="head: the last layer (classifier[6]); classifier: the Linear layers; full: all layers")
    parser.add_argument("--new-head", action="store_true",
                        help="a fresh head even when the data set has the checkpoint's classes (the reference)")
    return parser


def main(argv: list[str] | None = None) -> None:
    guard_output()
    args, given = parse_flags(build_parser(), argv)
    report_errors("finetune.py", args.batch_size, lambda: finetune(args, given))


def finetune(args: argparse.Namespace, given: set[str]) -> dict | None:
    if args.resume is not None:  # its model comes from its resume state
        warn_if_started_from_older_weights(args)
        return train(args, given, "finetune", None, trainable)
    check_checkpoint_is_no_run_file(args)
    checkpoint = load_checkpoint(args.checkpoint)
    take_preprocessing(args, given, checkpoint)
    args.started_from = weights_fingerprint(checkpoint)  # kept in the run's args, through every resume
    return train(args, given, "finetune", functools.partial(new_model, checkpoint=checkpoint), trainable)


def check_checkpoint_is_no_run_file(args: argparse.Namespace) -> None:
    """No file the run writes (--out and its side files) may be the --checkpoint it starts from, by any name (a
    symlink, another spelling): --overwrite would replace the run's own source."""
    for path in (Path(args.out), *side_files(Path(args.out)).values()):
        with contextlib.suppress(OSError):  # a file that is not there is not the checkpoint
            if os.path.samefile(path, args.checkpoint):
                raise UsageError(f"--out {args.out}: the run would write {path}, which is --checkpoint "
                                 f"{args.checkpoint}, the weights fine-tuning starts from (--overwrite never replaces "
                                 "them); choose another --out")


def take_preprocessing(args: argparse.Namespace, given: set[str], checkpoint: dict) -> None:
    """--image-size and --stored-size from the checkpoint unless given, as torchvision's references keep a model's
    preprocessing; in the checkpoint's own data folder, its run's --stored-size flag (the same image cache)."""
    stored = checkpoint["args"].get("stored_size") if same_data_folder(args, checkpoint) else checkpoint["stored_size"]
    for name, value, what in (("image_size", checkpoint["image_size"], "was trained at"),
                              ("stored_size", stored, "stored its training images at")):
        if name not in given and getattr(args, name) != value:
            setattr(args, name, value)  # its features were learnt at that size, not at the default
            flag = f"--{name.replace('_', '-')}"
            print(f"{flag} {value}: the size {args.checkpoint} {what} (pass {flag} to choose another)")


def weights_fingerprint(checkpoint: dict) -> dict:
    """What a fine-tuning started from: the checkpoint's epoch and a hash of its weights (its later test report or
    temperature change the file, not the weights)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(checkpoint["model"].items()):
        digest.update(name.encode())
        digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy())  # no copy of the bytes
    return {"epoch": checkpoint.get("epoch"), "sha256": digest.hexdigest()}


def warn_if_started_from_older_weights(args: argparse.Namespace) -> None:
    """A resume continues the weights it started from; a --checkpoint trained further since (`invoke all --resume`
    after pretrain trained on) is said in one line, and how to fine-tune the newer weights instead."""
    with contextlib.suppress(Exception):  # no warning: the resume itself says what is wrong with its state
        state = torch.load(args.resume, map_location="cpu", weights_only=True, mmap=True)  # mmap: no weights read
        stored = state["args"]
        now = weights_fingerprint(torch.load(recorded_path(state, stored["checkpoint"]), map_location="cpu",
                                             weights_only=True, mmap=True))
        if stored["started_from"]["sha256"] != now["sha256"]:
            print(f"finetune.py: warning: --checkpoint {stored['checkpoint']} changed since this fine-tuning started "
                  f"from it (its epoch {stored['started_from']['epoch']} then, epoch {now['epoch']} now): the resume "
                  "continues from the older weights; to fine-tune the newer ones, start again with --overwrite "
                  "instead of --resume", file=sys.stderr)


if __name__ == "__main__":
    run_script(main)
