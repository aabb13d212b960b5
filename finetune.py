"""Transfer a trained AlexNet to a class-folder data set: a new head, then train it.

    python finetune.py                        # the reference: freeze all, new head, CIFAR-10
    python finetune.py --data-dir my_photos --mode full --checkpoint checkpoints/pretrain.pt

--mode head trains only the new last layer (classifier[6]); classifier trains all
Linear layers; full trains everything. The data set may have any classes.
"""
from torch import nn

from model import AlexNet, load_checkpoint, model_from_checkpoint
from pretrain import given_flags, make_parser, report_errors, train

TRAINED_PARTS = {"head": ("classifier.6.",), "classifier": ("classifier.",), "full": ("",)}


def main(argv: list[str] | None = None) -> None:
    parser = make_parser(__doc__.split("\n\n")[0], "finetune")
    parser.add_argument("--checkpoint", default="checkpoints/pretrain.pt", help="the trained model to start from")
    parser.add_argument("--mode", choices=sorted(TRAINED_PARTS), default="head", help="which layers to train")
    args = parser.parse_args(argv)

    def new_model(classes: list[str]) -> AlexNet:
        model = model_from_checkpoint(load_checkpoint(args.checkpoint), args.checkpoint)
        model.classifier[6] = nn.Linear(model.classifier[6].in_features, len(classes))
        return model

    def trainable(model: AlexNet) -> list[nn.Parameter]:
        prefixes = TRAINED_PARTS[args.mode]
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.startswith(prefixes))
        return [p for p in model.parameters() if p.requires_grad]

    report_errors("finetune.py", args, lambda: train(args, given_flags(parser, argv), "finetune", new_model, trainable))


if __name__ == "__main__":
    main()
