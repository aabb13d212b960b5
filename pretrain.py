"""Train AlexNet from scratch on a class-folder data set (CIFAR-10 by default).

    python pretrain.py                       # the reference: 40 epochs, SGD lr 0.01, 224 px
    python pretrain.py --resume checkpoints/pretrain.last.pt   # continue a stopped run

The training images are split into train and validation (stratified, seeded);
the best epoch on validation is kept as --out, and the test split is evaluated
once, at the end, with those weights. finetune.py runs the same loop.
"""
import argparse
import csv
import json
import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import data
from model import (MIN_IMAGE_SIZE, AlexNet, CheckpointError, CheckpointWriter, load_checkpoint, load_matching,
                   resolve_device, save_checkpoint, unwrap_state_dict)

# A resume continues the stopped run: every other flag comes from its checkpoint,
# and a different value for one of them on the command line is refused.
RESUME_FLAGS_FROM_COMMAND_LINE = ("epochs", "device", "resume")

# An epoch's running sums, kept on the device so that no step waits for the host: summed loss, correct
# predictions, and the first step whose loss was not finite (-1: none yet).
EPOCH_START = (0.0, 0.0, -1.0)


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be zero or a positive number, got {text}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {text}")
    return value


def image_size(text: str) -> int:
    value = int(text)
    if value < MIN_IMAGE_SIZE:
        raise argparse.ArgumentTypeError(f"AlexNet needs images of at least {MIN_IMAGE_SIZE} px, got {text}")
    return value


def make_parser(description: str, stage: str) -> argparse.ArgumentParser:
    """The flags pretrain.py and finetune.py share, with the same names and meanings."""
    parser = argparse.ArgumentParser(description=description, formatter_class=data.HelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--data-dir", default="data/cifar10", help="folder with train/<class>/ and test/<class>/")
    parser.add_argument("--out", default=f"checkpoints/{stage}.pt",
                        help="best-validation checkpoint; .last.pt, .csv and .test.json are written beside it")
    parser.add_argument("--epochs", type=positive_int, default=40, help="passes over the training images")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="images per step, over all torchrun processes")
    parser.add_argument("--lr", type=positive_float, default=0.01, help="SGD learning rate")
    parser.add_argument("--momentum", type=non_negative_float, default=0.9, help="SGD momentum")
    parser.add_argument("--weight-decay", type=non_negative_float, default=0.0, help="SGD weight decay")
    parser.add_argument("--val-size", type=positive_int, default=None,
                        help="validation images held out of train/ (default: 10%%, at most 5000)")
    parser.add_argument("--image-size", type=image_size, default=224, help="side of the network's input")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu ... (default: cuda if available, else cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the split, the initialisation and the augmentation")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="use only this many images of train/ (stratified), validation included: quick runs (default: all)")
    parser.add_argument("--resume", default=None, metavar="PATH",
                        help="continue the run that left this .last.pt, with its flags (only --epochs and --device may change)")
    parser.add_argument("--augment", choices=sorted(data.AUGMENTATIONS), default="rrc",
                        help="rrc: RandomResizedCrop (the reference); crop: 1/8-padded random crop; both then resized and flipped")
    parser.add_argument("--cutout", type=fraction, default=0.0, metavar="FRACTION",
                        help="cutout: a square of this fraction of --image-size per image set to the mean colour; 0: off")
    parser.add_argument("--label-smoothing", type=non_negative_float, default=0.0, help="of the training loss")
    parser.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                        help="per step, after --warmup-epochs of linear warm-up")
    parser.add_argument("--warmup-epochs", type=non_negative_float, default=0.0, help="linear warm-up of the learning rate")
    parser.add_argument("--ema", type=fraction, default=0.0, metavar="DECAY",
                        help="evaluate and keep an exponential moving average of the weights, updated every step (e.g. 0.999); 0: off")
    parser.add_argument("--tta", action="store_true",
                        help="evaluate (validation, test, and later predict.py) on each image and its mirror, averaging logits")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="training arithmetic: auto is bf16 autocast on CUDA, fp32 on the CPU; evaluation is always fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    return parser


def given_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """Destinations of the flags that appear on the command line (abbreviations are off)."""
    argv = sys.argv[1:] if argv is None else argv
    return {action.dest for action in parser._actions for option in action.option_strings
            if any(token == option or token.startswith(option + "=") for token in argv)}


def apply_resume(args: argparse.Namespace, given: set[str], state: dict) -> None:
    """Take the run's flags from the resume checkpoint; refuse a changed one rather than ignore it."""
    stored = state["args"]
    changed = [f"--{name.replace('_', '-')} {getattr(args, name)} (the run used {stored.get(name)})"
               for name in sorted(given) if name not in RESUME_FLAGS_FROM_COMMAND_LINE and getattr(args, name) != stored.get(name)]
    if changed:
        raise data.UserError(f"--resume {args.resume}: {', '.join(changed)}; a resume continues the run with its own "
                             "flags (only --epochs and --device may change): drop these flags or start a new run")
    for name, value in stored.items():
        if name not in given or name not in RESUME_FLAGS_FROM_COMMAND_LINE:
            setattr(args, name, value)


class StopSignal:
    """Turns the first SIGINT/SIGTERM into a request to save and stop at the next step."""

    def __init__(self) -> None:
        self.received = None

    def __enter__(self) -> "StopSignal":
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame) -> None:
        if self.received is not None:  # a second signal: stop now, without saving
            raise KeyboardInterrupt
        self.received = signal.Signals(signum)

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def side_files(out: Path) -> dict[str, Path]:
    return {"last": out.with_suffix(".last.pt"), "csv": out.with_suffix(".csv"), "test": out.with_suffix(".test.json")}


@torch.no_grad()
def compute_logits(model: nn.Module, images: torch.Tensor, image_size: int, batch_size: int, flip: bool = False) -> torch.Tensor:
    """The evaluation path: centre crop on the device, batched; predict.py uses it too.

    With `flip` (--tta) the logits are the mean over the crop and its mirror image.
    """
    model.eval()

    def logits(x: torch.Tensor) -> torch.Tensor:
        return (model(x).float() + model(x.flip(3)).float()) / 2 if flip else model(x).float()

    return torch.cat([logits(data.eval_batch(images[i:i + batch_size], image_size)) for i in range(0, len(images), batch_size)])


def classification_report(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    labels = labels.to(logits.device)
    confusion = torch.zeros(len(classes), len(classes), dtype=torch.int64)
    confusion.index_put_((labels.cpu(), logits.argmax(1).cpu()), torch.ones(len(labels), dtype=torch.int64), accumulate=True)
    per_class = confusion.diag() / confusion.sum(1).clamp(min=1)
    return {
        "images": len(labels),
        "loss": F.cross_entropy(logits, labels).item(),
        "accuracy": (confusion.diag().sum() / len(labels)).item(),
        "per_class_accuracy": {name: per_class[i].item() for i, name in enumerate(classes)},
        "confusion_matrix": confusion.tolist(),  # rows: true class, columns: predicted
    }


def print_report(title: str, report: dict, classes: list[str]) -> None:
    print(f"{title}: accuracy {report['accuracy']:.2%} on {report['images']} images, loss {report['loss']:.4f}")
    width = max(len(name) for name in classes)
    for name, accuracy in report["per_class_accuracy"].items():
        print(f"  {name:>{width}}  {accuracy:7.2%}")
    print("confusion matrix (rows: true, columns: predicted):")
    print(" " * (width + 2) + " ".join(f"{name[:5]:>5}" for name in classes))
    for name, row in zip(classes, report["confusion_matrix"]):
        print(f"  {name:>{width}}" + " ".join(f"{count:5d}" for count in row))


def checkpoint_of(model: nn.Module, args: argparse.Namespace, stage: str, classes: list[str], stored_size: int,
                  epoch: int, metrics: dict) -> dict:
    """What rebuilds and describes the model; plain types only, so weights_only loading works."""
    return {
        "model": unwrap_state_dict(model.state_dict()),
        "model_args": {"num_classes": len(classes), "dropout": model.classifier[0].p},
        "classes": list(classes),
        "image_size": args.image_size,
        "stored_size": stored_size,
        "tta": args.tta,
        "mean": list(data.MEAN),
        "std": list(data.STD),
        "stage": stage,
        "epoch": epoch,
        "metrics": metrics,
        "args": dict(vars(args)),
    }


class Processes:
    """The processes torchrun started (one without torchrun): rank, device, and the few collectives used.

    `--batch-size` is global: each step, every process takes its share
    (positions rank, rank + world, ...) of the same global batch.
    """

    def __init__(self, device_name: str | None) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.main = self.rank == 0
        self.device = resolve_device(device_name)
        if self.world > 1:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    def share(self) -> slice:
        return slice(self.rank, None, self.world)

    def reduce(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor, op or dist.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool) -> bool:
        """Whether any process has the flag set: a signal to one process stops them all."""
        if self.world == 1:
            return flag
        return bool(self.reduce(torch.tensor([float(flag)], device=self.device), dist.ReduceOp.MAX).item())

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        gathered = [None] * self.world
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1:
            dist.destroy_process_group()


def learning_rate(args: argparse.Namespace, epoch: int, step: int, steps: int) -> float:
    """--lr after linear warm-up, then constant or cosine to zero at the last step; a function of the step alone."""
    progress = epoch + (step + 1) / steps  # epochs done after this step
    if progress <= args.warmup_epochs:
        return args.lr * progress / args.warmup_epochs
    if args.lr_schedule == "cosine":
        return args.lr * 0.5 * (1 + math.cos(math.pi * (progress - args.warmup_epochs) / (args.epochs - args.warmup_epochs)))
    return args.lr


def train_step(net: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
               args: argparse.Namespace, rng: torch.Generator, processes: "Processes", bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on a global batch of uint8 images (this process's share of it).

    Returns the summed loss and the number of correct predictions as device
    tensors, so the caller decides when to wait for them.
    """
    share = processes.share()
    x = data.train_batch(images, args.image_size, rng, share, args.augment, args.cutout)
    if x.is_cuda:  # cuDNN's fastest convolutions take NHWC
        x = x.contiguous(memory_format=torch.channels_last)
    y = labels[share]
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = net(x)
    loss = F.cross_entropy(logits.float(), y, reduction="sum", label_smoothing=args.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    # the mean over the global batch: DDP averages the processes' gradients, hence the factor world
    (loss * (processes.world / len(images))).backward()
    optimizer.step()
    return loss.detach(), (logits.argmax(1) == y).sum()


def prepare_model(model: AlexNet, params: list[nn.Parameter], args: argparse.Namespace, processes: "Processes"
                  ) -> tuple[nn.Module, torch.optim.Optimizer, bool]:
    """The network to train (DDP- and compile-wrapped as asked), its optimizer, and whether it trains in bf16."""
    device = processes.device
    model.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.contiguous_format)
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                                **({"fused": True} if device.type == "cuda" else {}))
    if processes.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        net = model
    if args.compile:
        net = torch.compile(net)
    return net, optimizer, args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")


def prepare_data(args: argparse.Namespace, processes: Processes) -> tuple[data.ImageSet, data.ImageSet, data.ImageSet]:
    """Train, validation and test images on the device; the first process builds the cache, the others read it."""
    if not processes.main:
        processes.barrier()
    train_images, test_images = data.load_dataset(args.data_dir)
    if processes.main:
        processes.barrier()
    if args.limit is not None:
        if args.limit > len(train_images.labels):
            raise data.UserError(f"--limit {args.limit}: {args.data_dir}/train has only {len(train_images.labels)} images")
        train_images = train_images.subset(data.stratified_split(train_images.labels, args.limit, args.seed)[0])
    val_size = args.val_size or min(5000, len(train_images.labels) // 10)
    if not 0 < val_size < len(train_images.labels):
        raise data.UserError(f"--val-size {val_size}: must be between 1 and {len(train_images.labels) - 1}, "
                             f"the training images there are {len(train_images.labels)}; pass a smaller --val-size or more data")
    val_index, train_index = data.stratified_split(train_images.labels, val_size, args.seed)
    device = processes.device
    return train_images.subset(train_index).to(device), train_images.subset(val_index).to(device), test_images


def train(args: argparse.Namespace, given: set[str], stage: str, new_model: Callable[[list[str]], AlexNet],
          trainable: Callable[[AlexNet], list[nn.Parameter]], start_competes: bool = False) -> dict | None:
    """Train, keep the best validation epoch, then evaluate the test split once. Returns the test report.

    `given` names the flags set on the command line; `new_model(classes)` builds
    the model of a fresh run; `trainable(model)` returns the parameters to train.
    With `start_competes` the starting weights are validated too, as epoch 0, and
    kept if no epoch beats them: a fine-tuned model never validates below its start.
    Under torchrun every process runs this; only the first prints and writes.
    """
    state = None
    if args.resume is not None:
        state = load_checkpoint(args.resume)
        if "optimizer" not in state:
            raise data.UserError(f"--resume {args.resume}: holds no training state; pass the .last.pt file beside --out")
        apply_resume(args, given, state)
    out = Path(args.out)
    files = side_files(out)
    processes = Processes(args.device)
    device = processes.device
    log = print if processes.main else lambda *a, **k: None
    if state is not None and len(state["rng"]["processes"]) != processes.world:
        raise data.UserError(f"--resume {args.resume}: the run had {len(state['rng']['processes'])} processes, this has "
                             f"{processes.world}; resume it with torchrun --nproc_per_node={len(state['rng']['processes'])}")
    if processes.main:
        check_writable(out)

    train_images, val_images, test_images = prepare_data(args, processes)
    classes, stored_size, n = train_images.classes, train_images.stored_size, len(train_images.labels)

    torch.manual_seed(args.seed)
    if state is None:
        model = new_model(classes)
    else:
        model = AlexNet(**state["model_args"])
        model.load_state_dict(state["model"])
    net, optimizer, bf16 = prepare_model(model, trainable(model), args, processes)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema)) if args.ema else None
    evaluated = ema.module if ema is not None else model  # the weights that are validated, kept and tested
    torch.manual_seed(args.seed + processes.rank)  # dropout: its own masks in each process
    augment = torch.Generator(device=device).manual_seed(args.seed)  # the same in every process: one global batch
    start_epoch, start_step, history, best = 0, 0, [], {"val_acc": -1.0, "epoch": 0}
    running = torch.tensor(EPOCH_START, device=device)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        own = state["rng"]["processes"][processes.rank]
        torch.set_rng_state(own["torch"])
        if device.type == "cuda" and own["cuda"] is not None:
            torch.cuda.set_rng_state(own["cuda"], device)
        augment.set_state(state["rng"]["augment"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start_epoch, start_step, history, best = state["epoch"], state["step"], state["history"], state["best"]
        running = own["running"].to(device)
        log(f"resuming {stage} from {args.resume}: epoch {start_epoch + 1}, step {start_step}; flags from the "
            f"checkpoint, --epochs {args.epochs} and --device from the command line when given")
        if state.get("finished") and start_epoch >= args.epochs:
            raise data.UserError(f"--resume {args.resume}: this run already finished {start_epoch} epochs; "
                                 "pass a larger --epochs to train further")

    steps = math.ceil(n / args.batch_size)
    log(f"{stage}: {n} training, {len(val_images.labels)} validation, {len(test_images.labels)} test images, "
        f"{len(classes)} classes, stored at {stored_size} px, trained at {args.image_size} px, on {device}"
        + (f" x {processes.world} processes" if processes.world > 1 else "")
        + f", {'bf16' if bf16 else 'fp32'}{', compiled' if args.compile else ''}"
        + f", {sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters")

    def save_resume_state(epoch: int, step: int, perm: torch.Tensor | None, finished: bool = False) -> None:
        """Every process's RNG and running sums go to the first process, which writes the file."""
        own = {"torch": torch.get_rng_state(), "running": running.cpu(),
               "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        every = processes.gather(own)
        if processes.main:
            writer.save(checkpoint_of(model, args, stage, classes, stored_size, epoch, history[-1] if history else {}) | {
                "optimizer": optimizer.state_dict(), "rng": {"processes": every, "augment": augment.get_state()},
                "ema": None if ema is None else ema.state_dict(),
                "step": step, "perm": perm, "history": history, "best": best, "finished": finished}, files["last"])

    def stop_here(signal_received: signal.Signals | None, epoch: int, step: int) -> None:
        writer.wait()
        processes.barrier()
        if processes.main:
            stopped(signal_received or signal.SIGTERM, stage, epoch, step, files["last"], processes.world)
        processes.close()
        sys.exit(128 + (signal_received or signal.SIGTERM))

    def validate() -> dict:
        # every process evaluates the whole validation split: identical weights, identical results
        return classification_report(compute_logits(evaluated, val_images.images, args.image_size, args.batch_size, args.tta),
                                     val_images.labels, classes)

    with StopSignal() as stop, CheckpointWriter() as writer:
        if start_competes and state is None:
            val = validate()
            best = {"val_acc": val["accuracy"], "epoch": 0}
            if processes.main:
                writer.save(checkpoint_of(evaluated, args, stage, classes, stored_size, 0,
                                          {"epoch": 0, "val_loss": val["loss"], "val_acc": val["accuracy"]}), out)
                print(f"epoch   0/{args.epochs}  {'(the starting weights)':25}val_loss {val['loss']:.4f}  "
                      f"val_acc {val['accuracy']:6.2%}  *best", flush=True)
        for epoch in range(start_epoch, args.epochs):
            started = time.perf_counter()
            model.train()
            if start_step and state is not None:
                perm = state["perm"].to(device)
            else:
                perm = torch.randperm(n, generator=augment, device=device)
                running.copy_(torch.tensor(EPOCH_START))
            for step in range(start_step, steps):
                index = perm[step * args.batch_size:(step + 1) * args.batch_size]
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(args, epoch, step, steps)
                loss, correct = train_step(net, optimizer, train_images.images[index], train_images.labels[index],
                                           args, augment, processes, bf16)
                if ema is not None:
                    ema.update_parameters(model)
                first_bad = torch.where((running[2] < 0) & ~torch.isfinite(loss), float(step), running[2])
                running.copy_(torch.stack([running[0] + loss, running[1] + correct, first_bad]))
                if processes.any(stop.received is not None) and step + 1 < steps:
                    save_resume_state(epoch, step + 1, perm.cpu())
                    stop_here(stop.received, epoch, step + 1)
            start_step = 0
            totals = processes.reduce(running[:2].clone())
            first_bad = processes.reduce(running[2:].clone(), dist.ReduceOp.MAX if processes.world > 1 else None)
            (train_loss, train_correct), first_bad = totals.tolist(), first_bad.item()  # the host syncs of the epoch
            if first_bad >= 0:
                raise data.UserError(f"the training loss became {train_loss} at epoch {epoch + 1}, step {int(first_bad) + 1}; "
                                     f"lower --lr (now {args.lr}) and start again")
            train_seconds = time.perf_counter() - started
            val = validate()
            history.append({"epoch": epoch + 1, "train_loss": train_loss / n, "train_acc": train_correct / n,
                            "val_loss": val["loss"], "val_acc": val["accuracy"], "lr": optimizer.param_groups[0]["lr"],
                            "images_per_s": n / train_seconds, "epoch_s": time.perf_counter() - started})
            improved = val["accuracy"] > best["val_acc"]
            if improved:
                best = {"val_acc": val["accuracy"], "epoch": epoch + 1}
                if processes.main:
                    writer.save(checkpoint_of(evaluated, args, stage, classes, stored_size, epoch + 1, history[-1]), out)
            save_resume_state(epoch + 1, 0, None, finished=epoch + 1 == args.epochs)
            if processes.main:
                write_csv(files["csv"], history)
                print_epoch(history, args.epochs, improved)
            if processes.any(stop.received is not None) and epoch + 1 < args.epochs:
                stop_here(stop.received, epoch + 1, 0)

    processes.close()
    if not processes.main:
        return None
    final = load_checkpoint(out, map_location=device)
    evaluated.load_state_dict(final["model"])
    test = classification_report(compute_logits(evaluated, test_images.to(device).images, args.image_size, args.batch_size, args.tta),
                                 test_images.labels, classes)
    print(f"best validation accuracy {best['val_acc']:.2%} at epoch {best['epoch']}"
          f"{' (the starting weights)' if best['epoch'] == 0 else ''}; the test split, evaluated once with those weights:")
    print_report("test", test, classes)
    test |= {"checkpoint": str(out), "epoch": best["epoch"], "val_acc": best["val_acc"]}
    save_checkpoint(final | {"test_metrics": test}, out)
    files["test"].write_text(json.dumps(test, indent=2) + "\n")
    print(f"saved {out} (best validation epoch), {files['last']} (resume state), {files['csv']}, {files['test']}")
    return test


def check_writable(out: Path) -> None:
    """Fail before training, not after the first epoch, when --out cannot be written."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out.parent).close()
    except OSError as e:
        raise data.UserError(f"--out {out}: cannot write in {out.parent} ({e.strerror or e}); choose a writable folder") from None


def stopped(signum: signal.Signals, stage: str, epoch: int, step: int, last: Path, world: int) -> None:
    where = f"epoch {epoch + 1}, step {step}" if step else f"the end of epoch {epoch}"
    launcher = "python" if world == 1 else f"torchrun --nproc_per_node={world}"
    print(f"{stage}.py: stopped by {signum.name} at {where}; resume with: {launcher} {stage}.py --resume {last}",
          file=sys.stderr)


def write_csv(path: Path, history: list[dict]) -> None:
    """Rewritten whole from the history each epoch, so a resumed run's log has no duplicate rows."""
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    tmp.replace(path)


def print_epoch(history: list[dict], epochs: int, improved: bool) -> None:
    row = history[-1]
    remaining = (epochs - row["epoch"]) * sum(r["epoch_s"] for r in history) / len(history)
    print(f"epoch {row['epoch']:3d}/{epochs}  loss {row['train_loss']:.4f}  acc {row['train_acc']:6.2%}  "
          f"val_loss {row['val_loss']:.4f}  val_acc {row['val_acc']:6.2%}  {row['images_per_s']:7.0f} img/s  "
          f"{row['epoch_s']:6.1f} s  eta {time.strftime('%H:%M:%S', time.gmtime(remaining))}" + ("  *best" if improved else ""),
          flush=True)


def initial_weights(source: str) -> dict:
    """--init: a torchvision AlexNet state dict file (or one of our checkpoints), or 'imagenet'."""
    if source == "imagenet":
        try:
            from torchvision.models import AlexNet_Weights
            return AlexNet_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
        except Exception as e:  # no network, a proxy, a broken cache: all end the same way
            raise data.UserError(f"--init imagenet: cannot get torchvision's ImageNet AlexNet weights ({e}); download "
                                 "alexnet-owt-7be5be79.pth where there is internet and pass --init PATH") from None
    try:
        loaded = torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise data.UserError(f"--init {source}: no such file; pass a state dict file or 'imagenet'") from None
    except Exception as e:
        raise data.UserError(f"--init {source}: not a loadable state dict ({e}); pass a torchvision AlexNet state dict") from None
    return loaded["model"] if isinstance(loaded, dict) and "model" in loaded else loaded


def main(argv: list[str] | None = None) -> None:
    parser = make_parser(__doc__.split("\n\n")[0], "pretrain")
    parser.add_argument("--init", default=None, metavar="PATH|imagenet",
                        help="start from a torchvision AlexNet state dict, tensors matched by name and shape (default: from scratch)")
    args = parser.parse_args(argv)

    def new_model(classes: list[str]) -> AlexNet:
        model = AlexNet(num_classes=len(classes))
        if args.init is not None:
            loaded, skipped = load_matching(model, initial_weights(args.init))
            print(f"--init {args.init}: loaded {len(loaded)} tensors; kept fresh (name or shape differs): {', '.join(skipped) or 'none'}")
        return model

    report_errors("pretrain.py", args, lambda: train(args, given_flags(parser, argv), "pretrain", new_model,
                                                     lambda model: list(model.parameters())))


def report_errors(program: str, args: argparse.Namespace, job: Callable[[], object]) -> object:
    """Run a script's work; a user's mistake or an expected fault ends as one line on stderr."""
    try:
        return job()
    except (data.UserError, CheckpointError) as e:
        sys.exit(f"{program}: {e}")
    except torch.cuda.OutOfMemoryError:
        sys.exit(f"{program}: out of GPU memory with --batch-size {args.batch_size}; pass a smaller --batch-size, "
                 f"e.g. {max(1, args.batch_size // 2)}")
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        sys.exit(f"{program}: interrupted; nothing more was saved")


if __name__ == "__main__":
    main()
