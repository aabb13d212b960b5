"""Train AlexNet from scratch on a class-folder data set (CIFAR-10 by default).

    python pretrain.py                       # the reference: 40 epochs, SGD lr 0.01, 224 px
    python pretrain.py --resume checkpoints/pretrain.last.pt   # continue a stopped run

The training images are split into train and validation (stratified, seeded); the best epoch on validation is kept
as --out, and the test split is evaluated once, at the end, with those weights. finetune.py runs the same loop.
This file reads top to bottom as torchvision's references/classification/train.py does (see the section lines).
"""
from __future__ import annotations

import signal

if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a Ctrl-C while torch loads: killed quietly (then cli.run_script's)

import argparse
import contextlib
import csv
import errno
import hashlib
import io
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import cli
import data
from model import (EMA, REFERENCE_HIDDEN, AlexNet, CheckpointError, checkpoint_dict, load_checkpoint, load_matching,
                   load_tensors, non_finite, recorded_path)
from predict import (calibration_report, classification_report, compute_logits, confusion_picture, fit_temperature,
                     learning_curves, print_report)

# The only flags a resume may change (others that differ are refused): --epochs (a larger one trains further), --stream
# (no result changes), --device (its arithmetic; see restore), --data-dir (the same images moved: fingerprint compared).
RESUME_MAY_CHANGE = ("epochs", "device", "stream", "data_dir")
MAY_CHANGE_FLAGS = " and ".join(", ".join(f"--{name.replace('_', '-')}" for name in names)  # "--epochs, ... and --x"
                                for names in (RESUME_MAY_CHANGE[:-1], RESUME_MAY_CHANGE[-1:]))

# What a run writes beside --out (see side_files); an --out with one of these endings would overwrite another run's.
SIDE_SUFFIXES = {"last": ".last.pt", "csv": ".csv", "test": ".test.json", "curves": ".png",
                 "confusion": ".confusion.png"}

RESUME_WITH = "ALEXNET_RESUME_WITH"  # set by tasks.py: the command the user typed, a template of {stage} and {last}


def main(argv: list[str] | None = None) -> None:
    cli.guard_output()
    args, given = parse_flags(build_parser(), argv)
    cli.report_errors("pretrain.py", args.batch_size,
                      lambda: train(args, given, "pretrain", new_model, lambda args, model: list(model.parameters())))


def train(args: argparse.Namespace, given: set[str], stage: str,
          new_model: Callable[[argparse.Namespace, data.ImageSet], tuple[AlexNet, bool]] | None,
          trainable: Callable[[argparse.Namespace, AlexNet], list[nn.Parameter]]) -> dict | None:
    """Train, keep the best validation epoch, test it once; returns the test report. `given`: the command line's flags;
    `new_model(args, train_images)`: a fresh run's model and whether its starting weights compete as epoch 0 (None:
    resume only); `trainable(args, model)`: what trains. Under torchrun all processes run this; the first writes."""
    state, args = (None, args) if args.resume is None else read_resume_state(args, given, stage)
    processes = cli.Processes(args.device)
    check_before_training(args, state, processes)
    with out_lock(Path(args.out)) if processes.main else contextlib.nullcontext():
        if state is None and processes.main:
            check_no_run_there(args)
            if args.overwrite:  # the replaced run's resume state would pair with this run's first checkpoint
                side_files(Path(args.out))["last"].unlink(missing_ok=True)
        train_images, val_images, test_images = prepare_data(args, processes)
        torch.manual_seed(args.seed)
        # a resume's saved order and sums index the training images as they were, at the size they were stored at
        was = (state.get("data_fingerprint", train_images.fingerprint), state["stored_size"]) if state else None
        if was is not None and was != (train_images.fingerprint, train_images.stored_size):
            size = f", or stored at {train_images.stored_size} px, not {was[1]}" * (was[1] != train_images.stored_size)
            raise cli.UsageError(f"--resume {args.resume}: the images in {args.data_dir}/train changed since the run "
                                 f"started (added, removed or modified files{size}); restore them, or start a new run")
        model, starting_weights_compete = (new_model(args, train_images) if state is None
                                           else (AlexNet(**state["model_args"]), False))
        run = start_run(args, stage, processes, model, trainable(args, model), train_images, val_images, test_images)
        progress = Progress(new_sums(processes.device)) if state is None else restore(run, state)
        announce(run, progress, state)
        return fit(run, progress, starting_weights_compete)


# --------------------------------------------------------------------------- the epoch loop


def fit(run: Run, progress: Progress, starting_weights_compete: bool) -> dict | None:
    """The epoch loop, then the test: train, validate, keep the best, write the resume state. A signal stops at the
    next step, resume state saved (a second one, or one during the test, at once): a line says where; exit 128 + N."""
    writer = cli.CheckpointWriter(save_checkpoint)
    command = resume_advice(run.stage, side_files(run.out)["last"], run.processes.world)
    where = None  # where a signal stopped the run
    with cli.StopSignal() as signals:
        try:
            with writer:
                if run.args.resume is not None and run.processes.main and progress.history:  # killed between a resume
                    write_log(run, progress)  # state and its log, a run left its log an epoch behind: caught up
                if starting_weights_compete:
                    start_competes(run, progress, writer)
                if progress.epoch >= run.args.epochs and not progress.finished:  # a resume's --epochs ends it here
                    save_resume_state(run, progress, writer, finished=True)
                while progress.epoch < run.args.epochs:
                    started = time.perf_counter() - progress.seconds  # a resumed epoch's seconds before its stop
                    if finished := train_one_epoch(run, progress, signals, writer, started):
                        end_epoch(run, progress, started, writer)
                    if not finished or (run.processes.any(signals.received is not None)
                                        and progress.epoch < run.args.epochs):
                        writer.wait()
                        run.processes.barrier()
                        where = f"at {progress.position}; resume with: {command}"
                        break
            run.processes.close()
            if where is None and signals.received is None:
                signals.at_once = True  # the trained run is saved: a signal now stops the test at once
                return test_once(run, progress) if run.processes.main else None
            received = signals.received or signal.SIGTERM  # or another process got the signal
            if where is None:  # it came as the last epoch ended: no step to stop at
                where = f"after the last epoch; the trained run is saved; its test report: {command}"
            where = f"by {received.name} {where}"
        except WriteFailed as e:  # a full disk: the advice is what this run left on disk allows
            if e.full and (run.args.resume is not None or os.fspath(side_files(run.out)["last"]) in writer.written):
                raise WriteFailed(e.failure, e.full, f"free disk space, then resume with: {command}") from None
            if e.full and os.fspath(run.out) in writer.written:  # its first epoch's best alone: no state to resume
                raise WriteFailed(e.failure, e.full, "free disk space, then start again with --overwrite") from None
            raise
        except KeyboardInterrupt as e:  # a second signal, or one during the test
            received = cli.signal_of(e)  # the second's (a SIGINT after a SIGHUP ends as a Ctrl-C)
            if signals.at_once:
                where = (f"by {received.name} during the test evaluation; the trained run is saved; its test report: "
                         f"{command}")
            elif progress.saved is None or writer.error is not None:
                where = f"at once by a second signal, {received.name}; no resume state was saved"
            else:
                where = (f"at once by a second signal, {received.name}; the resume state at {progress.saved} is "
                         f"saved: resume with: {command}")
        if run.processes.main:
            print(f"{run.stage}.py: stopped {where}", file=sys.stderr)
        sys.exit(128 + received)


def train_one_epoch(run: Run, progress: Progress, signals: cli.StopSignal, writer: cli.CheckpointWriter,
                    started: float) -> bool:
    """The epoch's steps from `progress.step` on; False when a signal stopped it (its state and seconds saved)."""
    args, processes, sums, images = run.args, run.processes, progress.sums, run.train_images
    n, steps = len(images), math.ceil(len(images) / args.batch_size)
    run.model.train()
    if progress.perm is None:
        progress.perm = torch.randperm(n, generator=run.augment, device=processes.device)
        progress.sums = sums = new_sums(processes.device)
    stopped, done = False, progress.step * args.batch_size
    line = cli.ProgressLine(f"epoch {progress.epoch + 1}/{args.epochs}" if processes.main else None, n, done=done)
    # closed however the loop ends (a stop, an error): a streamed set's reading ahead ends with it
    batches = images.batches(progress.perm, progress.step, args.batch_size, processes.share())
    with contextlib.closing(batches):
        for step, (x, y) in zip(range(progress.step, steps), batches):
            for group in run.optimizer.param_groups:
                group["lr"] = learning_rate(args, progress.epoch, step, steps)
            loss, correct = train_step(run, x, y, min(args.batch_size, n - step * args.batch_size))
            if run.ema is not None:
                run.ema.update_parameters(run.model)
            sums["first_bad"] = torch.where((sums["first_bad"] < 0) & ~torch.isfinite(loss), float(step),
                                            sums["first_bad"])
            sums["loss"] += loss
            sums["correct"] += correct
            done = min(n, (step + 1) * args.batch_size)
            if line.due(done):  # the loss so far: this process's share, scaled to all
                line.show(done, f", loss {sums['loss'].item() * processes.world / done:.4f}")
            if processes.any(signals.received is not None) and step + 1 < steps:
                progress.step, progress.seconds, stopped = step + 1, time.perf_counter() - started, True
                break
    line.close()  # also on a stop: the stop's message starts a line of its own
    if stopped:
        save_resume_state(run, progress, writer)
    return not stopped


def train_step(run: Run, images: torch.Tensor, labels: torch.Tensor, batch: int) -> tuple[torch.Tensor, ...]:
    """One SGD step on a global batch of `batch` uint8 images, of which `images` and `labels` are this process's
    share. Returns the summed loss and the number right as device tensors: the caller decides when to wait."""
    args, world = run.args, run.processes.world
    x = data.train_batch(images, args.image_size, run.augment, run.processes.share(), args.augment, args.cutout, batch)
    x = x.contiguous(memory_format=run.layout)  # cuDNN's and oneDNN's fastest convolutions take NHWC
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=run.bf16):
        logits = run.net(x)
    loss = F.cross_entropy(logits.float(), labels, reduction="sum", label_smoothing=args.label_smoothing)
    run.optimizer.zero_grad(set_to_none=True)
    (loss * (world / batch)).backward()  # the mean over the global batch: DDP averages the processes' gradients
    run.optimizer.step()
    return loss.detach(), (logits.argmax(1) == labels).sum()


def learning_rate(args: argparse.Namespace, epoch: int, step: int, steps: int) -> float:
    """--lr after linear warm-up, then constant or cosine to zero at the last step; a function of the step alone."""
    progress = epoch + (step + 1) / steps  # epochs done after this step
    if progress <= args.warmup_epochs:
        return args.lr * progress / args.warmup_epochs
    if args.lr_schedule == "cosine":
        cosine_progress = (progress - args.warmup_epochs) / (args.epochs - args.warmup_epochs)
        return args.lr * 0.5 * (1 + math.cos(math.pi * cosine_progress))
    return args.lr


def new_sums(device: torch.device) -> dict[str, torch.Tensor]:
    """An epoch's sums on the device (no step waits for the host); first_bad: the first non-finite loss's step."""
    return {"loss": torch.zeros((), device=device), "correct": torch.zeros((), device=device),
            "first_bad": torch.full((), -1.0, device=device)}


def diverged(what: str, args: argparse.Namespace) -> None:
    """A diverged run ends before its epoch is logged or kept. Diverged: a loss not finite, or a validation loss over
    100 x ln(classes), a uniform guess's (where training starts): logits hundreds apart; learning stays a few x it."""
    decay = f" or --weight-decay (now {args.weight_decay})" if args.lr * args.weight_decay >= 1 else ""
    raise cli.UsageError(f"{what}: the weights diverged; start again with a lower --lr (now {args.lr}){decay} "
                         "and --overwrite")


def end_epoch(run: Run, progress: Progress, started: float, writer: cli.CheckpointWriter) -> None:
    """Validate, log, keep the weights if validation improved, and write the resume state."""
    n, sums, epoch = len(run.train_images), progress.sums, progress.epoch + 1
    loss, correct = run.processes.reduce(torch.stack([sums["loss"], sums["correct"]])).tolist()  # the one wait
    first_bad = run.processes.reduce(sums["first_bad"].clone(), largest=True).item()
    if first_bad >= 0:
        diverged(f"the training loss became {loss} at epoch {epoch}, step {int(first_bad) + 1}", run.args)
    train_seconds = time.perf_counter() - started
    val = evaluate(run.evaluated, run.val_images, run.args)
    if not val["loss"] < 100 * math.log(len(run.val_images.classes)):  # see diverged; NaN too compares False
        diverged(f"the validation loss became {val['loss']:.4g} at epoch {epoch}", run.args)
    progress.history.append({"epoch": epoch, "train_loss": loss / n, "train_acc": correct / n,
                             "val_loss": val["loss"], "val_acc": val["accuracy"],
                             "lr": run.optimizer.param_groups[0]["lr"], "images_per_s": n / train_seconds,
                             "epoch_s": time.perf_counter() - started, "code": cli.code_version(),
                             "torch": str(torch.__version__)})  # not its TorchVersion: weights_only refuses it
    # a tie in accuracy goes to the lower loss: on a small set accuracy stays put for epochs while the loss falls
    if improved := (val["accuracy"], -val["loss"]) > (progress.best["val_acc"], -progress.best["val_loss"]):
        progress.best = progress.history[-1]
    best = checkpoint_of(run, run.evaluated, epoch, progress.history[-1]) if improved else None
    progress.epoch, progress.step, progress.perm, progress.seconds = epoch, 0, None, 0.0
    first = progress.saved is None  # no resume state on disk yet
    save_resume_state(run, progress, writer, finished=epoch == run.args.epochs, best=best)
    if run.processes.main:
        if first:  # the log comes after the first resume state: a run killed between them left a log and no state,
            writer.wait()  # which a fresh run refused (an earlier run's files) and no --resume could continue
        write_log(run, progress)
        print_epoch(progress.history, run.args.epochs, improved)
        cli.say_if_stdout_lost(f"{run.stage}.py", f"training goes on, each epoch is logged in "
                               f"{side_files(run.out)['csv']}", closed_pipe=True)


def start_competes(run: Run, progress: Progress, writer: cli.CheckpointWriter) -> None:
    """Fine-tuning with the checkpoint's head: its weights are validated as epoch 0 and kept if no epoch beats them."""
    val = evaluate(run.evaluated, run.val_images, run.args)
    progress.history.append({"epoch": 0, "val_loss": val["loss"], "val_acc": val["accuracy"],  # the .csv's too
                             "code": cli.code_version(), "torch": str(torch.__version__)})
    progress.best = progress.history[0]
    # with its resume state: a run killed in epoch 1 resumes (before: --out alone, for which a fresh run was refused)
    best = checkpoint_of(run, run.evaluated, 0, progress.history[0]) if run.processes.main else None
    save_resume_state(run, progress, writer, best=best)
    if run.processes.main:
        print(f"epoch   0/{run.args.epochs}  {'(the starting weights)':25}val_loss {val['loss']:.4f}  "
              f"val_acc {val['accuracy']:6.2%}  *best", flush=True)


def write_log(run: Run, progress: Progress) -> None:
    """The .csv and .png from the history: after each epoch, and as a resume starts (see fit)."""
    write_csv(side_files(run.out)["csv"], progress.history)
    write_run_file(side_files(run.out)["curves"], "learning curves", lambda f: learning_curves(
        progress.history, progress.best["epoch"], f"{run.stage}: {run_name(run.out).name}, {progress.epoch} of "
        f"{max(progress.epoch, run.args.epochs)} epochs").save(f, format="PNG"))


def print_epoch(history: list[dict], epochs: int, improved: bool) -> None:
    row = history[-1]
    seconds = [r["epoch_s"] for r in history if "epoch_s" in r]  # not epoch 0's starting weights: none trained
    remaining = (epochs - row["epoch"]) * sum(seconds) / len(seconds)
    print(f"epoch {row['epoch']:3d}/{epochs}  loss {row['train_loss']:.4f}  acc {row['train_acc']:6.2%}  "
          f"val_loss {row['val_loss']:.4f}  val_acc {row['val_acc']:6.2%}  {row['images_per_s']:7.0f} img/s  "
          f"{row['epoch_s']:6.1f} s  eta {cli.clock(remaining)}" + ("  *best" if improved else ""), flush=True)


# --------------------------------------------------------------------------- evaluation and the test, once


def evaluate(model: nn.Module, images: data.ImageSet, args: argparse.Namespace) -> dict:
    """Predict's evaluation path on a split; under torchrun every process evaluates all of it (same result)."""
    return classification_report(split_logits(model, images, args), images.labels, images.classes)


def split_logits(model: nn.Module, images: data.ImageSet, args: argparse.Namespace, title: str | None = None
                 ) -> torch.Tensor:
    with contextlib.closing(images.batches(None, 0, args.batch_size)) as batches:
        return compute_logits(model, (x for x, _ in batches), args.image_size, args.tta, title, len(images))


def test_once(run: Run, progress: Progress) -> dict:
    """The best validation epoch's weights on the test split, the only look at it; the temperature calibrating their
    probabilities for predict.py is fitted on the validation split (Guo et al. 2017) and kept in the checkpoint."""
    best, files, device = progress.best, side_files(run.out), run.processes.device
    final = load_checkpoint(run.out)  # on the CPU: saved again with its report, it loads where there is no GPU
    tested = "test_metrics" in final and "temperature" in final  # a resume of a tested, calibrated run: its report
    test, temperature = (final["test_metrics"], final["temperature"]) if tested else (None, None)
    if not tested:
        run.evaluated.load_state_dict(final["model"])
        logits = split_logits(run.evaluated, data.place(run.test_images, device, run.args.stream), run.args, "test")
        temperature = fit_temperature(split_logits(run.evaluated, run.val_images, run.args), run.val_images.labels)
        test = classification_report(logits, run.test_images.labels, run.test_images.classes)
        test |= calibration_report(logits, run.test_images.labels, temperature)
    print(f"best validation accuracy {best['val_acc']:.2%} at epoch {best['epoch']}"
          f"{' (the starting weights)' if best['epoch'] == 0 else ''}; the test split, evaluated once with those "
          f"weights{' (when the run finished)' if tested else ''}:")
    print_report("test", test, run.train_images.classes)
    test = test | {"checkpoint": str(run.out)}  # where it is now: the folder may have moved since its test
    if not tested:
        test |= {"epoch": best["epoch"], "val_acc": best["val_acc"], "code": cli.code_version()}
        save_checkpoint(final | {"test_metrics": test, "temperature": temperature}, run.out)
    write_run_file(files["test"], "test report", lambda f: f.write((cli.json_text(test, indent=2) + "\n").encode()))
    write_run_file(files["confusion"], "confusion matrix picture", lambda f: confusion_picture(
        test["confusion_matrix"], run.test_images.classes, f"{run.stage}: {run_name(run.out).name}, the test split "
        f"({test['accuracy']:.1%} right; shade: share of the true class)").save(f, format="PNG"))
    print(f"saved {run.out} (best validation epoch), {files['last']} (resume state), {files['csv']} and "
          f"{files['curves']} (each epoch), {files['test']} and {files['confusion']} (the test)")
    return test


# --------------------------------------------------------------------------- setting up a run: flags


def make_parser(description: str, stage: str) -> argparse.ArgumentParser:
    """The flags pretrain.py and finetune.py share, with the same names and meanings."""
    parser = cli.ArgumentParser(description)
    add, fine = parser.add_argument, stage == "finetune"  # fine-tuning's sizes: its checkpoint's (take_preprocessing)
    add("--data-dir", default="data/cifar10", help="folder with train/<class>/ and test/<class>/")
    add("--out", default=f"checkpoints/{stage}.pt",
        help="best-validation checkpoint; .last.pt, .csv, .png, .test.json and .confusion.png are written beside "
             "it, named after it without a .pt/.pth ending (exp.1: exp.1.last.pt)")
    add("--epochs", type=cli.positive_int, default=40, help="passes over the training images")
    add("--batch-size", type=cli.positive_int, default=256, help="images per step, over all torchrun processes")
    add("--lr", type=cli.positive_float, default=0.01, help="SGD learning rate")
    add("--momentum", type=cli.fraction, default=0.9, help="SGD momentum")
    add("--weight-decay", type=cli.non_negative_float, default=0.0, help="SGD weight decay")
    add("--val-size", type=cli.positive_int, default=None,
        help="validation images held out of train/ (default: 10%%, at least one per class, at most 5000)")
    add("--image-size", type=cli.image_size, default=None if fine else 224,
        help="side of the network's input" + " (default: the checkpoint's)" * fine)
    add("--device", default="auto", help=cli.DEVICE_HELP)
    add("--seed", type=cli.random_seed, default=0, help="seeds the split, the initialisation and the augmentation")
    add("--limit", type=cli.positive_int, default=None,
        help="use only this many images of train/ (stratified), validation included: quick runs (default: all)")
    add("--resume", default=None, metavar="PATH",
        help=f"continue the run that left this .last.pt, with its flags (only {MAY_CHANGE_FLAGS} may change)")
    add("--overwrite", action="store_true",
        help="start afresh onto an --out that holds a run already, replacing its checkpoint, resume state, log and "
             "report (without it such a run is refused)")
    add("--augment", choices=sorted(data.AUGMENTATIONS), default="rrc",
        help="rrc: RandomResizedCrop (the reference); crop: 1/8-padded random crop; both then resized and flipped")
    add("--cutout", type=cli.fraction, default=0.0, metavar="FRACTION",
        help="cutout: a square of this fraction of --image-size per image set to the mean colour; 0: off")
    add("--label-smoothing", type=cli.fraction, default=0.0, help="of the training loss")
    add("--lr-schedule", choices=("constant", "cosine"), default="constant",
        help="per step, after --warmup-epochs of linear warm-up")
    add("--warmup-epochs", type=cli.non_negative_float, default=0.0, help="linear warm-up of the learning rate")
    add("--ema", type=cli.fraction, default=0.0, metavar="DECAY",
        help="evaluate and keep an exponential moving average of the weights, updated each step (e.g. 0.999); 0: off")
    add("--tta", action="store_true",
        help="evaluate (validation, test, and later predict.py) on each image and its mirror, averaging logits")
    add("--precision", choices=("auto", "bf16", "fp32"), default="auto",
        help="training arithmetic: auto is bf16 autocast (channels_last, fused SGD) on CUDA and on a CPU that "
             "computes bf16 natively (AMX or AVX512-BF16), else fp32 (MPS too); evaluation is always fp32")
    add("--compile", action="store_true", help="torch.compile the model for training")
    add("--stream", choices=("auto", "always", "never"), default="auto",
        help="stream each split's images to the device batch by batch from the memory-mapped cache, or copy them "
             "there whole (never); auto streams a split larger than half the device's free memory (the host's for "
             "the CPU); the results are the same")
    add("--stored-size", type=cli.stored_size, default=None,
        help="side the images are cached at (default: " + ("the checkpoint's" if fine else "their median shorter "
             "side, at most 256") + "); smaller keeps a large set's cache small")
    return parser


def parse_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, set[str]]:
    """The flags, and the names of those the command line gives: parsed a second time onto a namespace that already
    holds every name, argparse sets only the given ones (it fills in a default only where a name is missing)."""
    args = parser.parse_args(argv)
    unset = object()
    marked = parser.parse_args(argv, argparse.Namespace(**{name: unset for name in vars(args)}))
    return args, {name for name, value in vars(marked).items() if value is not unset}


def read_resume_state(args: argparse.Namespace, given: set[str], stage: str) -> tuple[dict, argparse.Namespace]:
    """The resume state and the run's flags from it; a changed flag is refused, not ignored. --out is beside the resume
    state (a moved folder too); a relative --data-dir is in the folder the run started in (one given now, this one)."""
    if args.overwrite:
        raise cli.UsageError(f"--overwrite with --resume {args.resume}: --overwrite starts a run afresh, --resume "
                             "continues one; pass one of them")
    state = load_checkpoint(args.resume)
    if "optimizer" not in state:
        raise cli.UsageError(f"--resume {args.resume}: holds no training state; pass the .last.pt file beside --out")
    if state["stage"] != stage:
        raise cli.UsageError(f"--resume {args.resume}: the state of a {state['stage']} run; resume it with "
                             f"{resume_advice(state['stage'], args.resume, len(state['rng']['processes']))}")
    stored = state["args"]
    changed = [f"--{name.replace('_', '-')} {getattr(args, name)} (the run used {stored.get(name)})"
               for name in sorted(given - {"resume", *RESUME_MAY_CHANGE}) if getattr(args, name) != stored.get(name)]
    if changed:
        raise cli.UsageError(f"--resume {args.resume}: {', '.join(changed)}; a resume continues the run with its own "
                             f"flags (only {MAY_CHANGE_FLAGS} may change): drop these flags or start a new run")
    reached = state["epoch"] + (state["step"] > 0)  # a lower --epochs would drop trained steps, and test early
    if "epochs" in given and not state["finished"] and args.epochs < reached:
        raise cli.UsageError(f"--epochs {args.epochs}: --resume {args.resume} stopped at "
                             f"{Progress({}, state['epoch'], state['step']).position}; pass --epochs {reached} or "
                             "more to finish it, or leave --epochs out")
    args = argparse.Namespace(**(vars(args) | stored | {name: getattr(args, name) for name in given | {"resume"}}))
    if "data_dir" not in given and Path(state.get("cwd", os.getcwd())) != Path.cwd():
        args.data_dir = recorded_path(state, args.data_dir)
    args.out = str(Path(args.resume).parent / Path(args.out).name)
    if state["best"]["val_acc"] >= 0 and not Path(args.out).exists():  # -1: no epoch validated yet
        raise cli.UsageError(f"--resume {args.resume}: its best checkpoint {args.out} (epoch "
                             f"{state['best']['epoch']}) is missing; put it back there, or start a new run")
    return state, args


def check_before_training(args: argparse.Namespace, state: dict | None, processes: cli.Processes) -> None:
    """Before any image is read: a resume in another number of processes, an --out that cannot be written."""
    if state is not None and (world := len(state["rng"]["processes"])) != processes.world:
        raise cli.UsageError(f"--resume {args.resume}: the run had {world} processes, this has {processes.world}; "
                             f"resume it with torchrun --nproc_per_node={world}")
    if not processes.main:
        return
    warn_about_warmup(args)
    if not Path(args.out).name or args.out.endswith(("/", os.sep)):  # Path drops the slash of `runs/`: a file `runs`
        raise cli.UsageError(f"--out {args.out!r}: names no file; pass the best-checkpoint name, e.g. runs/p.pt")
    if args.out.endswith(tuple(SIDE_SUFFIXES.values())):
        raise cli.UsageError(f"--out {args.out}: that name is for a run's resume state/log/report/pictures; pass "
                             "the best-checkpoint name, e.g. checkpoints/run.pt")
    cli.check_writable_file("--out", Path(args.out), "model.pt", make_folder=True)  # the run's lock is taken there


def warn_about_warmup(args: argparse.Namespace) -> None:
    """A warm-up as long as the run leaves no cosine phase, or a learning rate that never reaches --lr."""
    if args.lr_schedule == "cosine" and args.warmup_epochs >= args.epochs:
        effect = "the learning rate only warms up, there is no cosine phase"
    elif args.warmup_epochs > args.epochs:
        effect = (f"the learning rate never reaches --lr {args.lr} (it ends at "
                  f"{args.lr * args.epochs / args.warmup_epochs:.3g})")
    else:
        return
    print(f"warning: --warmup-epochs {args.warmup_epochs:g} with --epochs {args.epochs}: {effect}; pass a "
          "--warmup-epochs below --epochs", file=sys.stderr)


def check_no_run_there(args: argparse.Namespace) -> None:
    """A fresh run would replace the files of a run at --out: each is checked, a user's exp.csv beside exp.pt too."""
    out, files = Path(args.out), side_files(Path(args.out))
    found = [str(path) for path in (out, *files.values()) if path.exists()]
    if found and not args.overwrite:
        resume, last = "", files["last"]  # advice that works as printed: the state's script and processes; or none
        with contextlib.suppress(Exception):  # no resume state there (mapped: its weights are not read)
            state = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
            resume = f"continue it with {resume_advice(state['stage'], last, len(state['rng']['processes']))} (a " \
                "larger --epochs trains further), "
        named = ", ".join(found[:-1]) + " and " + found[-1] if len(found) > 1 else found[0]
        raise cli.UsageError(f"--out {args.out}: {named} exist{'s' * (len(found) == 1)} already, from an earlier run; "
                             f"{resume}choose another --out, or pass --overwrite to replace it")


# --------------------------------------------------------------------------- setting up a run: data and model


def prepare_data(args: argparse.Namespace, processes: cli.Processes) -> tuple[data.ImageSet, ...]:
    """Train and validation images placed for the device (see data.place), the test split mapped; the first process
    builds the cache, the others read it. --limit and the split are lists of rows of the cache, not copies."""
    if not processes.main:
        processes.barrier()
    # the data's warnings (images left out, a read-only folder's cache) said once, not by every process
    try:
        with contextlib.redirect_stderr(io.StringIO()) if not processes.main else contextlib.nullcontext():
            train_images, test_images = data.load_dataset(args.data_dir, args.stored_size)
    except data.NoDataFolder as e:
        raise cli.DataError(e.problem, "pass --data-dir FOLDER of train/<class>/ and test/<class>/ folders (python "
                            "download.py --source URL|ARCHIVE|FOLDER --root FOLDER makes one, splitting <class>/ "
                            "folders alone)") from None
    if processes.main:
        processes.barrier()
    if args.limit is not None:
        check_limit(args, train_images.labels, train_images.classes)
        train_images = train_images.subset(data.stratified_split(train_images.labels, args.limit, args.seed)[0])
    n, classes = len(train_images), len(train_images.classes)
    val_size = args.val_size or min(5000, max(n // 10, classes))  # 10 %, at least an image per class
    if args.val_size is None and val_size >= n:
        raise cli.UsageError(f"{args.data_dir}/train: {n} images{' (after --limit)' * bool(args.limit)} are too few to "
                             f"keep a validation image per class ({classes}) and train on the rest; use more images")
    if not 0 < val_size < n:
        raise cli.UsageError(f"--val-size {val_size}: must be between 1 and {n - 1}, the training images there are "
                             f"{n}; pass a smaller --val-size or more data")
    val_index, train_index = data.stratified_split(train_images.labels, val_size, args.seed)
    split = f"--val-size {val_size}" if args.val_size else f"the default validation split of {val_size}"
    check_every_class_trains(split, train_images.labels, train_index)
    return (data.place(train_images.subset(train_index), processes.device, args.stream),
            data.place(train_images.subset(val_index), processes.device, args.stream), test_images)


def check_limit(args: argparse.Namespace, labels: torch.Tensor, classes: list[str]) -> None:
    """--limit keeps every class, with an image to train and one to validate (all it has, if fewer)."""
    n, per_class = len(labels), torch.bincount(labels, minlength=len(classes))
    if args.limit > n:
        raise cli.UsageError(f"--limit {args.limit}: {args.data_dir}/train has only {n} images; "
                             f"pass --limit {n} or less, or leave it out to use them all")
    if args.limit < 2 * len(classes):
        raise cli.UsageError(f"--limit {args.limit}: too few for {len(classes)} classes, each needs one training "
                             f"and one validation image; pass --limit {2 * len(classes)} or more")
    needed = per_class.clamp(max=2)
    if short := (data.stratified_quota(per_class, args.limit) < needed).nonzero().flatten().tolist():
        enough = next(count for count in range(args.limit, n + 1)
                      if (data.stratified_quota(per_class, count) >= needed).all())
        raise cli.UsageError(f"--limit {args.limit}: a stratified sample this small leaves class "
                             f"{cli.shown(classes[short[0]])} ({int(per_class[short[0]])} images) without a "
                             f"training and a validation image; pass --limit {enough} or more")


def check_every_class_trains(split: str, labels: torch.Tensor, train_index: torch.Tensor) -> None:
    """A class the split left without training images cannot be learnt: the run would train and exit 0 anyway."""
    per_class = torch.bincount(labels.cpu())
    if (torch.bincount(labels.cpu()[train_index], minlength=len(per_class)) > 0).all():
        return
    # At most n(m-1)/m of n images, a class of m gets at most m-1 held out, whatever the split's rounding.
    largest = int((len(labels) * (per_class - 1) // per_class.clamp(min=1)).min())
    advice = f"pass --val-size {largest} or less" if largest > 0 else "give every class two images or more"
    raise cli.UsageError(f"{split}: leaves a class with no training image; {advice}")


@dataclass
class Run:
    """What a run trains with; set up once (start_run), then handed explicitly to each part of the loop."""
    args: argparse.Namespace
    stage: str
    processes: cli.Processes
    model: AlexNet  # the weights that train
    net: nn.Module  # what the step calls: the model, DDP- and compile-wrapped as asked
    optimizer: torch.optim.Optimizer
    bf16: bool
    layout: torch.memory_format  # channels_last (with the fused SGD) on CUDA, and in bf16 on the CPU: CUDA's path
    ema: EMA | None
    augment: torch.Generator  # the same in every process: the draws of one global batch
    out: Path
    train_images: data.ImageSet  # placed for the device (see prepare_data), as the validation images
    val_images: data.ImageSet | None = None
    test_images: data.ImageSet | None = None  # mapped, placed for the test alone

    @property
    def evaluated(self) -> nn.Module:  # the weights that are validated, kept and tested: the EMA's when there is one
        return self.model if self.ema is None else self.ema.module


@dataclass
class Progress:
    """Where a run is, besides weights, optimizer and RNGs; a resume restores it."""
    sums: dict[str, torch.Tensor]  # the epoch's running sums so far (new_sums), on the device
    epoch: int = 0  # epochs done
    step: int = 0  # the next step of the epoch under way
    perm: torch.Tensor | None = None  # the order of the epoch under way; None between epochs
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"val_acc": -1.0, "val_loss": math.inf, "epoch": 0})
    saved: str | None = None  # where the newest resume state handed to the writer is (see position); None: none yet
    seconds: float = 0.0  # the training seconds of the epoch under way before a stop (a resume carries them)
    finished: bool = False  # its resume state says the run trained all its epochs

    @property
    def position(self) -> str:  # where a stopped run is, as its messages say it
        return f"epoch {self.epoch + 1}, step {self.step}" if self.step else f"the end of epoch {self.epoch}"


def start_run(args: argparse.Namespace, stage: str, processes: cli.Processes, model: AlexNet,
              trainable: list[nn.Parameter], *images: data.ImageSet) -> Run:
    """What a run trains with (see Run): `images` are its training, validation and test images."""
    device = processes.device
    bf16 = args.precision == "bf16" or (args.precision == "auto" and cli.has_bf16_units(device))
    layout = torch.channels_last if device.type == "cuda" or bf16 else torch.contiguous_format
    model.to(device, memory_format=layout)
    cli.tune_for_training()
    optimizer = torch.optim.SGD(trainable, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                                **({"fused": True} if layout == torch.channels_last else {}))
    net = (nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
           if processes.distributed else model)
    net = cli.compiled(net, device) if args.compile else net
    ema = EMA(model, args.ema) if args.ema else None
    torch.manual_seed(args.seed + processes.rank)  # dropout: its own masks in each process
    augment = torch.Generator(device=device).manual_seed(args.seed)
    return Run(args, stage, processes, model, net, optimizer, bf16, layout, ema, augment, Path(args.out), *images)


def announce(run: Run, progress: Progress, state: dict | None) -> None:
    """The start line (a result: what trains, on what, how), after a resume's line."""
    if not run.processes.main:
        return
    if state is not None:
        print(f"resuming {run.stage} from {run.args.resume} at {progress.position}; flags from the checkpoint, "
              f"{MAY_CHANGE_FLAGS} from the command line when given")
        if state["finished"] and progress.epoch >= run.args.epochs:
            print(f"this run already finished {progress.epoch} epochs (pass a larger --epochs to train further): "
                  "its test report, of its best validation epoch's weights")
        elif run.args.lr_schedule == "cosine" and run.args.epochs != state["args"]["epochs"]:
            print(f"note: --epochs {run.args.epochs} with --lr-schedule cosine: from here the rate follows the "
                  f"cosine over {run.args.epochs} epochs, not the {state['args']['epochs']} it followed until now",
                  file=sys.stderr)
    args, images = run.args, run.train_images
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    how = ("bf16 autocast" if run.bf16 else "fp32") + ", channels_last, fused SGD" * (run.layout == torch.channels_last)
    print(f"{run.stage}: {len(images)} training, {len(run.val_images)} validation, {len(run.test_images)} test images, "
          f"{len(images.classes)} classes, stored at {images.stored_size} px, trained at {args.image_size} px, on "
          f"{run.processes.device}"
          + (f" x {run.processes.world} processes ({dist.get_backend()})" if run.processes.distributed else "")
          + f", {how} (--precision {args.precision}){', compiled' * hasattr(run.net, '_orig_mod')}, {trainable:,} "
          "trainable parameters")


# --------------------------------------------------------------------------- run files and checkpoints


def run_name(out: Path) -> Path:
    """--out less a .pt/.pth ending (exp.1: exp.1.last.pt), its side files' and lock's name: run.pt and run share it."""
    return out.with_suffix("") if out.suffix in (".pt", ".pth") else out


def side_files(out: Path) -> dict[str, Path]:
    base = run_name(out)
    return {kind: base.with_name(base.name + suffix) for kind, suffix in SIDE_SUFFIXES.items()}


def resume_advice(stage: str, last: str | os.PathLike, world: int = 1) -> str:
    """The command resuming a STAGE run of WORLD processes from LAST: RESUME_WITH, or the script named as this one."""
    launcher = "python" if world == 1 else f"torchrun --nproc_per_node={world}"
    ran = sys.argv[0] if os.path.basename(sys.argv[0]) in ("pretrain.py", "finetune.py") else ""
    quoted = subprocess.list2cmdline if sys.platform == "win32" else shlex.join
    return os.environ.get(RESUME_WITH, launcher + " {script} --resume {last}").format(
        stage=stage, script=quoted([os.path.join(os.path.dirname(ran), f"{stage}.py")]), last=quoted([os.fspath(last)]))


def out_lock(out: Path) -> cli.Lock:
    """Held on --out and its side files for the whole run: two runs writing the same files would mix them."""
    path = out.parent / f".{run_name(out).name}.lock"
    try:
        return cli.Lock(path, lambda owner: cli.UsageError(f"--out {out}: another run (pid {owner}) is writing it; "
                                                           "wait for that run to end or choose another --out"))
    except OSError as e:
        raise cli.UsageError(f"--out {out}: cannot write its lock file {path} ({e.strerror or e}); free disk "
                             "space, or choose another --out") from None


def save_checkpoint(checkpoint: dict, path: str | os.PathLike) -> None:
    write_run_file(path, "checkpoint", lambda f: torch.save(checkpoint, f))


def write_run_file(path: str | os.PathLike, what: str, write: Callable[[io.BufferedWriter], object]) -> None:
    """A checkpoint, log, report or picture, by cli.write_atomically (never half of it); a failure is one line."""
    try:
        cli.write_atomically(path, write)
    except OSError as e:
        kept = "the previous one is untouched" if os.path.exists(path) else "no part of it was left"
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        raise WriteFailed(f"{path}: cannot write the {what} ({e.strerror or e}); {kept}", full,
                          "free disk space, or choose a writable --out" if full else "choose another --out") from None


class WriteFailed(CheckpointError):
    """write_run_file's error: `failure` (what and why), then the advice (see `fit`); `full`: the disk or quota was."""

    def __init__(self, failure: str, full: bool, advice: str) -> None:
        super().__init__(f"{failure}: {advice}")
        self.failure, self.full = failure, full


def write_csv(path: Path, history: list[dict]) -> None:
    """Rewritten whole each epoch; plain CSV (a comment line is read as a header); all rows' columns (other code's)."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(k for row in history[::-1] for k in row)), restval="")
    writer.writeheader()
    writer.writerows(history)
    write_run_file(path, "training log", lambda f: f.write(text.getvalue().encode()))


def checkpoint_of(run: Run, model: nn.Module, epoch: int, metrics: dict) -> dict:
    """model.checkpoint_dict, with what describes the run that made it (cwd: what a relative --data-dir is in)."""
    images = run.train_images
    return checkpoint_dict(model, images.classes, run.args.image_size, images.stored_size, tta=run.args.tta,
                           mean=list(data.MEAN), std=list(data.STD), stage=run.stage, epoch=epoch, metrics=metrics,
                           args=dict(vars(run.args)), cwd=os.getcwd(), code=cli.code_version(),
                           data_fingerprint=images.fingerprint, eval_resize=data.EVAL_RESIZE)


def save_resume_state(run: Run, progress: Progress, writer: cli.CheckpointWriter, finished: bool = False,
                      best: dict | None = None) -> None:
    """Every process's RNG and running sums go to the first, which writes .last.pt; `best`, the epoch's new best
    checkpoint, is handed over with it and written first: a resume state on disk never names a best --out lacks."""
    own = {"torch": torch.get_rng_state(), "sums": {name: total.cpu() for name, total in progress.sums.items()},
           "cuda": torch.cuda.get_rng_state(run.processes.device) if run.processes.device.type == "cuda" else None}
    every = run.processes.gather(own)
    if not run.processes.main:
        return
    for kind in ("test", "confusion") if best is not None else ():  # the test report of the weights `best` replaces
        side_files(run.out)[kind].unlink(missing_ok=True)  # (an --overwrite or resumed run) would stay beside it
    state = checkpoint_of(run, run.model, progress.epoch, progress.history[-1] if progress.history else {}) | {
        "optimizer": run.optimizer.state_dict(), "rng": {"processes": every, "augment": run.augment.get_state()},
        "ema": None if run.ema is None else run.ema.state_dict(), "step": progress.step,
        "perm": None if progress.perm is None else progress.perm.cpu(), "history": progress.history,
        "best": progress.best, "finished": finished, "seconds": progress.seconds}
    writer.save_together(({} if best is None else {run.out: best}) | {side_files(run.out)["last"]: state})
    progress.saved = progress.position


def restore(run: Run, state: dict) -> Progress:
    """Everything a resume brings back, in one place: weights, optimizer, EMA, every RNG, where the run was."""
    device = run.processes.device
    run.model.load_state_dict(state["model"])
    groups = [group | {"fused": run.optimizer.defaults["fused"]} for group in state["optimizer"]["param_groups"]]
    run.optimizer.load_state_dict(state["optimizer"] | {"param_groups": groups})  # this device's SGD, not the saved
    for weight, kept in run.optimizer.state.items():  # the fused SGD reads a momentum in its weight's layout alone (a
        if kept.get("momentum_buffer") is not None:  # run moved to or from channels_last: CUDA's, a bf16 CPU's)
            kept["momentum_buffer"] = torch.empty_like(weight).copy_(kept["momentum_buffer"])
    if run.ema is not None:
        run.ema.load_state_dict(state["ema"])
    own = state["rng"]["processes"][run.processes.rank]
    torch.set_rng_state(own["torch"])
    if device.type == "cuda" and own["cuda"] is not None:
        torch.cuda.set_rng_state(own["cuda"], device)
    augment = state["rng"]["augment"]  # CUDA's is 16 bytes, the CPU's 5056: a run moved from another kind of device
    if len(augment) == len(run.augment.get_state()):  # draws on from a seed made of its state
        run.augment.set_state(augment)
    else:
        run.augment.manual_seed(int.from_bytes(hashlib.sha256(augment.numpy().tobytes()).digest()[:8], "little"))
    perm = None if state["perm"] is None else state["perm"].to(device)
    sums = {name: total.to(device) for name, total in own["sums"].items()}
    progress = Progress(sums, state["epoch"], state["step"], perm, state["history"],
                        seconds=state.get("seconds", 0.0), finished=state["finished"])  # "seconds" may be new
    progress.best = next((row for row in progress.history if row["epoch"] == state["best"]["epoch"]), progress.best)
    progress.saved = progress.position
    return progress


# --------------------------------------------------------------------------- pretrain.py's own


def build_parser() -> argparse.ArgumentParser:
    """pretrain.py's flags, also the `invoke pretrain` task's."""
    parser = make_parser(__doc__.split("\n\n")[0], "pretrain")
    parser.add_argument("--init", default=None, metavar="PATH|imagenet",
                        help="start from a torchvision AlexNet state dict, tensors matched by name and shape "
                             "(default: from scratch)")
    parser.add_argument("--hidden", type=cli.hidden_widths, default=",".join(map(str, REFERENCE_HIDDEN)),
                        metavar="WIDTH,WIDTH", help="the classifier's two hidden widths; smaller ones than the "
                        "reference's train faster on a CPU or a small set")
    return parser


def new_model(args: argparse.Namespace, images: data.ImageSet) -> tuple[AlexNet, bool]:
    """A fresh AlexNet, or one from --init's tensors where names and shapes match (a new head: never epoch 0)."""
    model = AlexNet(num_classes=len(images.classes), hidden=args.hidden)
    if args.init is not None:
        loaded, skipped = load_matching(model, initial_weights(args.init))
        print(f"--init {args.init}: loaded {len(loaded)} tensors; kept fresh (name or shape differs): "
              f"{', '.join(skipped) or 'none'}")
    return model, False


def initial_weights(source: str) -> dict:
    """--init: a torchvision AlexNet state dict file (or one of our checkpoints), or 'imagenet'."""
    if source == "imagenet":
        try:
            from torchvision.models import AlexNet_Weights
            return AlexNet_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
        except Exception as e:  # no network, a proxy, a broken cache: all end the same way
            raise cli.UsageError(f"--init imagenet: cannot get torchvision's ImageNet AlexNet weights ({e}); download "
                                 "alexnet-owt-7be5be79.pth where there is internet and pass --init PATH") from None
    try:
        loaded = load_tensors(source)
    except CheckpointError as e:  # it names the file: a missing one, a folder, a FIFO, damage, pickled code
        raise cli.UsageError(f"--init {e}; or pass 'imagenet'") from None
    weights = loaded["model"] if isinstance(loaded, dict) and "model" in loaded else loaded
    if not (isinstance(weights, dict) and all(isinstance(n, str) and isinstance(t, torch.Tensor)
                                              for n, t in weights.items())):
        raise cli.UsageError(f"--init {source}: not a state dict (it holds a {type(weights).__name__}, not names "
                             "mapped to tensors); pass a torchvision AlexNet state dict or a checkpoint of this "
                             "project")
    if diverged_tensors := non_finite(weights):
        raise cli.UsageError(f"--init {source}: its weights hold NaN or infinite values "
                             f"({', '.join(diverged_tensors[:3])}); pass weights of a training that did not diverge")
    return weights


if __name__ == "__main__":
    cli.run_script(main)
