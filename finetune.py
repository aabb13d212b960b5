"""Transfer a trained AlexNet to a class-folder data set: train its last layer (or more) there.

    python finetune.py                        # CIFAR-10 again: all frozen, the head trains on
    python finetune.py --new-head             # the reference: all frozen, a fresh head
    python finetune.py --data-dir my_photos --mode full --checkpoint checkpoints/pretrain.pt

--mode head trains only the last layer (classifier[6]); classifier trains all
Linear layers; full trains everything. The data set may have any classes: the
head is new unless they are the checkpoint's classes. The starting weights are
validated as epoch 0 and kept if no epoch beats them.
"""
import argparse
import functools
import os
import sys
from pathlib import Path

from torch import nn

from cli import UsageError, guard_output, report_errors
from model import AlexNet, load_checkpoint, model_from_checkpoint
from pretrain import make_parser, parse_flags, train

TRAINED_PARTS = {"head": ("classifier.6.",), "classifier": ("classifier.",), "full": ("",)}
# Flags that choose the validation split; the checkpoint's run trained on what its own split left.
SPLIT_FLAGS = ("seed", "val_size", "limit")


def warn_if_validation_was_trained_on(args: argparse.Namespace, checkpoint: dict) -> None:
    """Same data, another split: some validation images trained the checkpoint, so validation flatters it. The data
    folders are compared by their real paths, the checkpoint's relative one in the folder its run started in (this
    one, for a checkpoint from before that was kept): relative, absolute and linked names of a folder all warn."""
    source = checkpoint.get("args", {})
    if "data_dir" not in source or (os.path.realpath(os.path.join(checkpoint.get("cwd", ""), source["data_dir"]))
                                    != os.path.realpath(args.data_dir)):
        return
    differing = [f"--{name.replace('_', '-')} {flag_value_text(getattr(args, name))} "
                 f"(the checkpoint's run: {flag_value_text(source.get(name))})"
                 for name in SPLIT_FLAGS if source.get(name) != getattr(args, name)]
    if differing:
        print(f"finetune.py: warning: {', '.join(differing)}: this validation split holds images {args.checkpoint} "
              "trained on, so validation accuracy is optimistic and may pick the wrong epoch; the test split is "
              "unaffected. Use the checkpoint's values to avoid it", file=sys.stderr)


def flag_value_text(value) -> str:
    """A flag's value as the warning shows it: None is the flag left at its default."""
    return "default" if value is None else str(value)


def new_model(args: argparse.Namespace, classes: list[str], checkpoint: dict) -> AlexNet:
    """The checkpoint's model; its head is kept for the checkpoint's own classes (unless --new-head)."""
    model = model_from_checkpoint(checkpoint, args.checkpoint)
    if args.new_head or checkpoint["classes"] != classes:
        model.classifier[6] = nn.Linear(model.classifier[6].in_features, len(classes))
    else:
        print(f"{args.checkpoint} has this data set's classes: the head starts from its weights "
              "(--new-head: a fresh one)")
    warn_if_validation_was_trained_on(args, checkpoint)
    return model


def trainable(args: argparse.Namespace, model: AlexNet) -> list[nn.Parameter]:
    """--mode's layers train, the others are frozen."""
    prefixes = TRAINED_PARTS[args.mode]
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(prefixes))
    return [p for p in model.parameters() if p.requires_grad]


def build_parser() -> argparse.ArgumentParser:
    """finetune.py's flags, also the `invoke finetune` task's."""
    parser = make_parser(__doc__.split("\n\n")[0], "finetune")
    parser.add_argument("--checkpoint", default="checkpoints/pretrain.pt", help="the trained model to start from")
    parser.add_argument("--mode", choices=sorted(TRAINED_PARTS), default="head", help="which layers to train")
    parser.add_argument("--new-head", action="store_true",
                        help="a freshly initialised head even when the data set has the checkpoint's classes "
                             "(the reference)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    guard_output()
    args, given = parse_flags(parser, argv)
    report_errors("finetune.py", args.batch_size, lambda: finetune(args, given))


def finetune(args: argparse.Namespace, given: set[str]) -> dict | None:
    if args.resume is None and Path(args.out).resolve() == Path(args.checkpoint).resolve():
        raise UsageError(f"--out {args.out}: is the --checkpoint fine-tuning starts from and would overwrite it; "
                         "choose another --out")
    start_from = None  # a resume's model comes from its resume state
    if args.resume is None:
        checkpoint = load_checkpoint(args.checkpoint)
        if "image_size" not in given and args.image_size != checkpoint["image_size"]:
            args.image_size = checkpoint["image_size"]  # its features were learnt at that size, not at the default
            print(f"--image-size {args.image_size}: the size {args.checkpoint} was trained at (pass --image-size to "
                  "choose another)")
        start_from = functools.partial(new_model, checkpoint=checkpoint)
    return train(args, given, "finetune", start_from, trainable, starting_weights_compete=True)


if __name__ == "__main__":
    main()
