"""Train AlexNet from scratch on a class-folder data set (CIFAR-10 by default).

    python pretrain.py                       # the reference: 40 epochs, SGD lr 0.01, 224 px
    python pretrain.py --resume checkpoints/pretrain.last.pt   # continue a stopped run

The training images are split into train and validation (stratified, seeded);
the best epoch on validation is kept as --out, and the test split is evaluated
once, at the end, with those weights. finetune.py runs the same loop.

Sections: command line; processes and signals; a run's state; checkpoints
(what they hold, written atomically on a background thread, and read back by
a resume); setting up a run; the loop (train_one_epoch, evaluate, the epoch
loop in `train`); the test, once.
"""
import argparse
import contextlib
import csv
import functools
import hashlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import cli
import data
from model import (MIN_IMAGE_SIZE, AlexNet, CheckpointError, load_checkpoint, load_matching, load_tensors,
                   unwrap_state_dict)
from predict import (calibration_report, classification_report, compute_logits, confusion_picture, fit_temperature,
                     learning_curves, print_report)

# A resume continues the stopped run: every other flag comes from its checkpoint,
# and a different value for one of them on the command line is refused.
# --data-dir: the same images, moved (check_same_data compares them by their fingerprint); --stream: how the
# images reach the device, which changes no result
RESUME_FLAGS_FROM_COMMAND_LINE = ("epochs", "device", "resume", "data_dir", "stream")

# The largest --image-size: 4.6 times the reference's 224; stored images are at most 256 px, so more only fills memory.
MAX_IMAGE_SIZE = 1024

# An epoch's running sums, kept on the device so that no step waits for the host: summed loss, correct
# predictions, and the first step whose loss was not finite (-1: none yet).
EPOCH_START = (0.0, 0.0, -1.0)


# What a run writes beside --out (see side_files); an --out with one of these endings would overwrite another run's.
SIDE_SUFFIXES = {"last": ".last.pt", "csv": ".csv", "test": ".test.json", "curves": ".png",
                 "confusion": ".confusion.png"}
# Endings of --out that its side files replace (pretrain.pt: pretrain.last.pt); any other ending is kept (exp.1:
# exp.1.last.pt), so that --out exp.1 and --out exp.2 never share a side file.
CHECKPOINT_SUFFIXES = (".pt", ".pth")


# --------------------------------------------------------------------------- command line


def image_size(text: str) -> int:
    value = int(text)
    if value < MIN_IMAGE_SIZE:
        raise argparse.ArgumentTypeError(f"AlexNet needs images of at least {MIN_IMAGE_SIZE} px, got {text}")
    if value > MAX_IMAGE_SIZE:
        raise argparse.ArgumentTypeError(f"at most {MAX_IMAGE_SIZE} px (the reference used 224), got {text}")
    return value


def stored_size(text: str) -> int:
    value = int(text)
    if not 8 <= value <= MAX_IMAGE_SIZE:
        raise argparse.ArgumentTypeError(f"must be at least 8 and at most {MAX_IMAGE_SIZE} px, got {text}")
    return value


def make_parser(description: str, stage: str) -> argparse.ArgumentParser:
    """The flags pretrain.py and finetune.py share, with the same names and meanings."""
    parser = argparse.ArgumentParser(description=description, formatter_class=cli.HelpFormatter,
                                     allow_abbrev=False)
    add = parser.add_argument
    add("--data-dir", default="data/cifar10", help="folder with train/<class>/ and test/<class>/")
    add("--out", default=f"checkpoints/{stage}.pt",
        help="best-validation checkpoint; .last.pt, .csv and .test.json are written beside it, named after it "
             "without a .pt/.pth ending (exp.1: exp.1.last.pt)")
    add("--epochs", type=cli.positive_int, default=40, help="passes over the training images")
    add("--batch-size", type=cli.positive_int, default=256, help="images per step, over all torchrun processes")
    add("--lr", type=cli.positive_float, default=0.01, help="SGD learning rate")
    add("--momentum", type=cli.fraction, default=0.9, help="SGD momentum")
    add("--weight-decay", type=cli.non_negative_float, default=0.0, help="SGD weight decay")
    add("--val-size", type=cli.positive_int, default=None,
        help="validation images held out of train/ (default: 10%%, at most 5000)")
    add("--image-size", type=image_size, default=224, help="side of the network's input")
    add("--device", default="auto", help=cli.DEVICE_HELP)
    add("--seed", type=cli.random_seed, default=0, help="seeds the split, the initialisation and the augmentation")
    add("--limit", type=cli.positive_int, default=None,
        help="use only this many images of train/ (stratified), validation included: quick runs (default: all)")
    add("--resume", default=None, metavar="PATH",
        help="continue the run that left this .last.pt, with its flags (only --epochs, --device, --stream "
             "and, for images moved, --data-dir may change)")
    add("--overwrite", action="store_true",
        help="start afresh onto an --out that holds a run already, replacing its checkpoint, resume state, log and "
             "report (without it such a run is refused)")
    add("--augment", choices=sorted(data.AUGMENTATIONS), default="rrc",
        help="rrc: RandomResizedCrop (the reference); crop: 1/8-padded random crop; both then resized and flipped")
    add("--cutout", type=cli.fraction, default=0.0, metavar="FRACTION",
        help="cutout: a square of this cli.fraction of --image-size per image set to the mean colour; 0: off")
    add("--label-smoothing", type=cli.fraction, default=0.0, help="of the training loss")
    add("--lr-schedule", choices=("constant", "cosine"), default="constant",
        help="per step, after --warmup-epochs of linear warm-up")
    add("--warmup-epochs", type=cli.non_negative_float, default=0.0, help="linear warm-up of the learning rate")
    add("--ema", type=cli.fraction, default=0.0, metavar="DECAY",
        help="evaluate and keep an exponential moving average of the weights, updated every step "
             "(e.g. 0.999); 0: off")
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
    add("--stored-size", type=stored_size, default=None,
        help="side the images are cached at (default: their most common shorter side, at most 256); smaller "
             "keeps a large set's cache small")
    return parser


def given_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """Destinations of the flags that appear on the command line (abbreviations are off)."""
    argv = sys.argv[1:] if argv is None else argv
    return {action.dest for action in parser._actions for option in action.option_strings
            if any(token == option or token.startswith(option + "=") for token in argv)}


def resumed_args(args: argparse.Namespace, given: set[str], state: dict) -> argparse.Namespace:
    """The run's flags from the resume checkpoint; a changed one is refused rather than ignored."""
    stored = state["args"]
    changed = [f"--{name.replace('_', '-')} {getattr(args, name)} (the run used {stored.get(name)})"
               for name in sorted(given)
               if name not in RESUME_FLAGS_FROM_COMMAND_LINE and getattr(args, name) != stored.get(name)]
    if changed:
        raise cli.UsageError(f"--resume {args.resume}: {', '.join(changed)}; a resume continues the run with its own "
                         "flags (only --epochs, --device, --stream and, for moved images, --data-dir may "
                         "change): drop these flags or start a new run")
    from_command_line = {name for name in given if name in RESUME_FLAGS_FROM_COMMAND_LINE}
    return argparse.Namespace(**(vars(args) | {name: value for name, value in stored.items()
                                                if name not in from_command_line}))


def in_run_folder(args: argparse.Namespace, given: set[str], state: dict) -> argparse.Namespace:
    """The run's files, wherever the resume starts: else a resume from another folder splits the run across two.

    --out is beside its resume state (see side_files), even in a moved folder. The run's relative --data-dir is
    relative to the folder the run started in; one given with the resume, to this one.
    """
    started = state.get("cwd", os.getcwd())  # a state from before "cwd" was kept: this folder
    data_dir = args.data_dir
    if "data_dir" not in given and not Path(data_dir).is_absolute() and Path(started) != Path.cwd():
        data_dir = os.path.join(started, data_dir)
    return argparse.Namespace(**(vars(args) | {"out": str(Path(args.resume).parent / Path(args.out).name),
                                               "data_dir": data_dir}))


def check_best_kept(args: argparse.Namespace, state: dict) -> None:
    """Before training, not after an epoch: the run's best checkpoint so far is what its test evaluates."""
    if state["best"]["val_acc"] >= 0 and not Path(args.out).exists():  # -1: no epoch validated yet
        raise cli.UsageError(f"--resume {args.resume}: its best checkpoint {args.out} (epoch {state['best']['epoch']}) "
                         "is missing; put it back there, or start a new run")


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


def check_out(out: str) -> None:
    """Fail before training, not after the first epoch, when --out cannot be written."""
    if not Path(out).name:
        raise cli.UsageError(f"--out {out!r}: names no file; pass the best-checkpoint name, e.g. checkpoints/run.pt")
    if out.endswith(tuple(SIDE_SUFFIXES.values())):
        raise cli.UsageError(f"--out {out}: that name is for a run's resume state/log/report/pictures; pass the "
                             "best-checkpoint name, e.g. checkpoints/run.pt")
    cli.check_writable_file("--out", Path(out), "model.pt", make_folder=True)  # the run's lock is taken there


def check_no_run_there(args: argparse.Namespace, stage: str) -> None:
    """A fresh run would replace the checkpoint, resume state, log and report of the run already at --out."""
    out, last = Path(args.out), side_files(Path(args.out))["last"]
    found = [str(path) for path in (out, last) if path.exists()]
    if found and not args.overwrite:
        resume = f"continue it with {stage}.py --resume {last} (a larger --epochs trains further), " if last.exists() \
            else ""
        raise cli.UsageError(f"--out {args.out}: {' and '.join(found)} exist{'s' if len(found) == 1 else ''} already, "
                         f"from an earlier run; {resume}choose another --out, or pass --overwrite to replace it")


class OutLock(cli.Lock):
    """Held on --out and its side files for the whole run: two runs writing the same files would mix them."""

    def __init__(self, out: Path) -> None:
        path = out.parent / f".{run_name(out).name}.lock"
        try:
            super().__init__(path, lambda owner: cli.UsageError(
                f"--out {out}: another run (pid {owner}) is writing it; wait for that run to end or choose another "
                "--out"))
        except OSError as e:
            raise cli.UsageError(f"--out {out}: cannot write its lock file {path} ({e.strerror or e}); free disk space, "
                             "or choose another --out") from None


# --------------------------------------------------------------------------- processes and signals


class Processes:
    """The processes torchrun started (one without torchrun): rank, device, and the few collectives used.

    `--batch-size` is global: each step, every process takes its share
    (positions rank, rank + world, ...) of the same global batch. Host values (the stop flag each step, the
    resume state's pieces, barriers) go over a CPU (gloo) group: over NCCL, reading back a CUDA tensor would
    make the host wait for everything queued on the GPU.
    """

    def __init__(self, device_name: str | None) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.main = self.rank == 0
        # under torchrun, with one process too: the NCCL (gloo) and DDP code path, testable on a machine of one GPU
        self.distributed = "WORLD_SIZE" in os.environ
        self.device = cli.resolve_device(device_name)
        self.host_group = None  # the default group when that is gloo already
        if self.distributed:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            if dist.get_backend() != "gloo":
                self.host_group = dist.new_group(backend="gloo")

    def share(self) -> slice:
        return slice(self.rank, None, self.world)

    def reduce(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor, op or dist.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool) -> bool:
        """Whether any process has the flag set: a signal to one process stops them all, at the same step.

        It waits for the other processes' hosts, never for a device.
        """
        if self.world == 1:
            return flag
        flags = torch.tensor([float(flag)])
        dist.all_reduce(flags, dist.ReduceOp.MAX, group=self.host_group)
        return bool(flags.item())

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        gathered = [None] * self.world
        dist.all_gather_object(gathered, obj, group=self.host_group)
        return gathered

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.host_group)

    def close(self) -> None:
        if self.distributed:
            dist.destroy_process_group()


# --------------------------------------------------------------------------- a run's state

@dataclass
class Run:
    """What a run trains with; set up once, then handed explicitly to each part of the loop."""
    args: argparse.Namespace
    stage: str
    processes: Processes
    model: AlexNet  # the weights that train
    net: nn.Module  # what the step calls: the model, DDP- and compile-wrapped as asked
    optimizer: torch.optim.Optimizer
    bf16: bool
    ema: AveragedModel | None
    augment: torch.Generator  # the same in every process: the draws of one global batch
    classes: list[str]
    stored_size: int
    data_fingerprint: str  # the training files': a resume checks that they did not change
    out: Path

    @property
    def evaluated(self) -> nn.Module:
        """The weights that are validated, kept and tested: the EMA's when there is one."""
        return self.model if self.ema is None else self.ema.module


@dataclass
class Progress:
    """Where a run is, besides weights, optimizer and RNGs; a resume restores it."""
    running: torch.Tensor  # the epoch's sums so far (EPOCH_START), on the device
    epoch: int = 0  # epochs done
    step: int = 0  # the next step of the epoch under way
    perm: torch.Tensor | None = None  # the order of the epoch under way; None between epochs
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"val_acc": -1.0, "epoch": 0})
    saved: str | None = None  # where the newest resume state handed to the writer is (see position); None: none yet


def position(progress: Progress) -> str:
    """Where a stopped run is, as its messages say it."""
    if progress.step:
        return f"epoch {progress.epoch + 1}, step {progress.step}"
    return f"the end of epoch {progress.epoch}"


# --------------------------------------------------------------------------- checkpoints


def run_name(out: Path) -> Path:
    """What --out's side files and lock are named after: --out without a checkpoint ending (see CHECKPOINT_SUFFIXES).

    Two --out of one run name (run.pt, run.pth, run) share them, and so their lock: one runs at a time.
    """
    return out.with_suffix("") if out.suffix in CHECKPOINT_SUFFIXES else out


def side_files(out: Path) -> dict[str, Path]:
    base = run_name(out)
    return {kind: base.with_name(base.name + suffix) for kind, suffix in SIDE_SUFFIXES.items()}


def save_checkpoint(checkpoint: dict, path: str | os.PathLike) -> None:
    """Written atomically (cli.write_atomically): a crash or SIGKILL mid-write leaves the previous file intact."""
    write_run_file(path, "checkpoint", lambda f: torch.save(checkpoint, f))


def write_text(path: str | os.PathLike, what: str, text: str) -> None:
    """A log or report, atomically as a checkpoint: a reader, or a full disk, never meets half of it."""
    write_run_file(path, what, lambda f: f.write(text.encode()))


def write_picture(path: str | os.PathLike, what: str, picture: Image.Image) -> None:
    """A run's picture (PNG), atomically as a checkpoint."""
    write_run_file(path, what, lambda f: picture.save(f, format="PNG"))


def write_run_file(path: str | os.PathLike, what: str, write: Callable[[io.BufferedWriter], object]) -> None:
    """cli.write_atomically; a failure to write (a full disk, a read-only folder) is one line naming `what`."""
    try:
        cli.write_atomically(path, write)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot write the {what} ({e.strerror or e}); the previous one is untouched: "
                              "free disk space, or choose a writable --out") from None


def to_cpu(obj, reuse=None):
    """A copy of a checkpoint with every tensor copied to the CPU: training may go on changing the originals.

    `reuse`, an earlier copy of the same kind of checkpoint that nothing needs any more, lends its tensors of the
    same shape and dtype: copying into memory already touched takes about half the time of fresh memory.
    """
    if isinstance(obj, torch.Tensor):
        if isinstance(reuse, torch.Tensor) and (reuse.shape, reuse.dtype) == (obj.shape, obj.dtype):
            return reuse.copy_(obj.detach())
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        reuse = reuse if isinstance(reuse, dict) else {}
        return {key: to_cpu(value, reuse.get(key)) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        reuse = reuse if isinstance(reuse, (list, tuple)) and len(reuse) == len(obj) else [None] * len(obj)
        return type(obj)(to_cpu(value, old) for value, old in zip(obj, reuse))
    return obj


class CheckpointWriter:
    """Writes checkpoints on a background thread, so training does not wait for the disk.

    `save` copies the checkpoint's tensors to the CPU at once (what is written is the state at the call) and
    returns. Only the newest state of a file matters: a save replaces the one for the same path whose write has
    not started, so however slow the disk, at most two copies per path are held (one being written, one waiting
    or kept for reuse), and the newest state of every path reaches the disk. Writes follow the order of the
    newest saves; `save_together` saves several files at once, so that no other write starts between them.
    `wait` blocks until every save is on disk; it, and the next save, raise the first error a write met. Leaving
    the `with` block writes what is left and ends the thread.
    """

    def __init__(self) -> None:
        self.changed = threading.Condition()  # guards the fields below; notified whenever one of them changes
        self.pending: dict[str, dict] = {}  # path -> its newest copy not yet being written, in order of saving
        self.spare: dict[str, dict] = {}  # path -> a written copy, whose memory the next save of that path reuses
        self.writing = False
        self.closing = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self.run, name="checkpoint-writer", daemon=True)
        self.thread.start()

    def run(self) -> None:
        while True:
            with self.changed:
                while not self.pending and not self.closing:
                    self.changed.wait()
                if not self.pending:
                    return
                path = next(iter(self.pending))
                checkpoint = self.pending.pop(path)
                self.writing = True
            try:
                if self.error is None:
                    save_checkpoint(checkpoint, path)
            except BaseException as e:  # handed to the training thread at its next save or wait
                self.error = e
            with self.changed:
                self.spare[path] = checkpoint
                self.writing = False
                self.changed.notify_all()

    def save(self, checkpoint: dict, path: str | os.PathLike) -> None:
        self.save_together({path: checkpoint})

    def save_together(self, files: dict) -> None:
        """Saves {path: checkpoint} at once: they are written in this order, and no other write starts between."""
        self.raise_error()
        files = {os.fspath(path): checkpoint for path, checkpoint in files.items()}
        with self.changed:  # an unstarted write of a path is dropped, a newer state replaces it: its memory is reused
            reuse = {path: self.pending.pop(path, None) or self.spare.pop(path, None) for path in files}
        copies = {path: to_cpu(checkpoint, reuse[path]) for path, checkpoint in files.items()}
        with self.changed:
            self.pending.update(copies)
            self.changed.notify_all()

    def wait(self) -> None:
        with self.changed:
            while self.pending or self.writing:
                self.changed.wait()
        self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        """Every saved checkpoint is on disk when the block ends, by an error too; a write's error is raised."""
        with self.changed:
            self.closing = True
            self.changed.notify_all()
        self.thread.join()
        self.spare.clear()
        if kind is None:
            self.raise_error()


def write_csv(path: Path, history: list[dict]) -> None:
    """Rewritten whole from the history each epoch, so a resumed run's log has no duplicate rows."""
    text = io.StringIO(newline="")
    text.write(f"# {code_version()}, torch {torch.__version__}\n")  # a comment line: csv readers skip it with #
    writer = csv.DictWriter(text, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    write_text(path, "training log", text.getvalue())


@functools.cache
def code_version() -> str:
    """The code a run used, kept in its checkpoints, log and test report so that a figure traces to its code.

    The git commit of this project's checkout (`-dirty` when tracked files differ from it); outside a checkout of
    its own (the scripts copied elsewhere), a hash of the scripts beside this file.
    """
    here = Path(__file__).resolve().parent
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=here, capture_output=True, text=True)
        if top.returncode == 0 and Path(top.stdout.strip()).resolve() == here:
            head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                                  check=True).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                   capture_output=True, text=True, check=True).stdout.strip()
            return f"commit {head}" + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):  # no git, or a checkout without a commit
        pass
    digest = hashlib.sha256()
    for script in sorted(here.glob("*.py")):
        digest.update(script.name.encode() + b"\0" + script.read_bytes())
    return f"scripts sha256 {digest.hexdigest()[:12]}"


def checkpoint_of(run: Run, model: nn.Module, epoch: int, metrics: dict) -> dict:
    """What rebuilds and describes the model; plain types only, so weights_only loading works."""
    return {
        "model": unwrap_state_dict(model.state_dict()),
        "model_args": {"num_classes": len(run.classes), "dropout": run.model.classifier[0].p},
        "classes": list(run.classes),
        "image_size": run.args.image_size,
        "stored_size": run.stored_size,
        "tta": run.args.tta,
        "mean": list(data.MEAN),
        "std": list(data.STD),
        "stage": run.stage,
        "epoch": epoch,
        "metrics": metrics,
        "args": dict(vars(run.args)),
        "code": code_version(),
    }


def save_resume_state(run: Run, progress: Progress, writer: CheckpointWriter, finished: bool = False,
                      best: dict | None = None) -> None:
    """Every process's RNG and running sums go to the first process, which writes the .last.pt file.

    `best`, the epoch's new best checkpoint, is handed over together with it and so written first: a resume
    state on disk never names a best epoch that --out does not hold yet, even if the run is killed.
    """
    device = run.processes.device
    own = {"torch": torch.get_rng_state(), "running": progress.running.cpu(),
           "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    every = run.processes.gather(own)
    if not run.processes.main:
        return
    metrics = progress.history[-1] if progress.history else {}
    state = checkpoint_of(run, run.model, progress.epoch, metrics) | {
        "optimizer": run.optimizer.state_dict(), "rng": {"processes": every, "augment": run.augment.get_state()},
        "ema": None if run.ema is None else run.ema.state_dict(), "step": progress.step,
        "perm": None if progress.perm is None else progress.perm.cpu(), "history": progress.history,
        "best": progress.best, "finished": finished, "data_fingerprint": run.data_fingerprint, "cwd": os.getcwd()}
    writer.save_together(({} if best is None else {run.out: best}) | {side_files(run.out)["last"]: state})
    progress.saved = position(progress)


def read_resume_state(path: str, stage: str) -> dict:
    state = load_checkpoint(path)
    if "optimizer" not in state:
        raise cli.UsageError(f"--resume {path}: holds no training state; pass the .last.pt file beside --out")
    if state["stage"] != stage:
        raise cli.UsageError(f"--resume {path}: the state of a {state['stage']} run; resume it with "
                         f"{state['stage']}.py --resume {path}")
    return state


def restore(run: Run, state: dict) -> Progress:
    """Everything a resume brings back, in one place: weights, optimizer, EMA, every RNG, where the run was."""
    device, rank = run.processes.device, run.processes.rank
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.ema is not None:
        run.ema.load_state_dict(state["ema"])
    own = state["rng"]["processes"][rank]
    torch.set_rng_state(own["torch"])
    if device.type == "cuda" and own["cuda"] is not None:
        torch.cuda.set_rng_state(own["cuda"], device)
    run.augment.set_state(state["rng"]["augment"])
    perm = None if state["perm"] is None else state["perm"].to(device)
    progress = Progress(own["running"].to(device), state["epoch"], state["step"], perm, state["history"], state["best"])
    progress.saved = position(progress)
    return progress


# --------------------------------------------------------------------------- setting up a run


def prepare_data(args: argparse.Namespace, processes: Processes) -> tuple[data.ImageSet, data.ImageSet, data.ImageSet]:
    """Train and validation images placed for the device (see data.place), the test split mapped; the first process
    builds the cache, the others read it. --limit and the split are lists of rows of the cache, not copies."""
    if not processes.main:
        processes.barrier()
    try:
        train_images, test_images = data.load_dataset(args.data_dir, args.stored_size)
    except data.NoDataFolder as e:
        raise cli.DataError(e.problem, "pass --data-dir FOLDER of train/<class>/ and test/<class>/ folders "
                            "(python download.py [--source URL|ARCHIVE] --root FOLDER makes one)") from None
    if processes.main:
        processes.barrier()
    n = len(train_images)
    if args.limit is not None:
        check_limit(args, train_images.labels, train_images.classes)
        train_images = train_images.subset(data.stratified_split(train_images.labels, args.limit, args.seed)[0])
        n = args.limit
    if args.val_size is None and n // 10 == 0:
        raise cli.UsageError(f"{args.data_dir}/train: {n} images (after --limit) are too few to hold out the default "
                         "validation split of 10 %; pass --val-size or use more images")
    val_size = args.val_size or min(5000, n // 10)
    if not 0 < val_size < n:
        raise cli.UsageError(f"--val-size {val_size}: must be between 1 and {n - 1}, the training images there are "
                         f"{n}; pass a smaller --val-size or more data")
    val_index, train_index = data.stratified_split(train_images.labels, val_size, args.seed)
    check_every_class_trains(val_size, train_images.labels, train_index)
    device = processes.device
    return (data.place(train_images.subset(train_index), device, args.stream),
            data.place(train_images.subset(val_index), device, args.stream), test_images)


def check_limit(args: argparse.Namespace, labels: torch.Tensor, classes: list[str]) -> None:
    """--limit keeps every class, with an image to train and one to validate (all it has, if fewer)."""
    n, per_class = len(labels), torch.bincount(labels, minlength=len(classes))
    if args.limit > n:
        raise cli.UsageError(f"--limit {args.limit}: {args.data_dir}/train has only {n} images; "
                         f"pass --limit {n} or less, or leave it out to use them all")
    if args.limit < 2 * len(classes):
        raise cli.UsageError(f"--limit {args.limit}: too few for {len(classes)} classes, each needs one training and "
                         f"one validation image; pass --limit {2 * len(classes)} or more")
    needed = per_class.clamp(max=2)
    short = (data.stratified_quota(per_class, args.limit) < needed).nonzero().flatten().tolist()
    if short:
        enough = next(count for count in range(args.limit, n + 1)
                      if (data.stratified_quota(per_class, count) >= needed).all())
        raise cli.UsageError(f"--limit {args.limit}: a stratified sample this small leaves class "
                         f"{cli.shown(classes[short[0]])} ({int(per_class[short[0]])} images) without a training "
                         f"and a validation image; pass --limit {enough} or more")


def check_every_class_trains(val_size: int, labels: torch.Tensor, train_index: torch.Tensor) -> None:
    """A class the split left without training images cannot be learnt: the run would train and exit 0 anyway."""
    per_class = torch.bincount(labels.cpu())
    if (torch.bincount(labels.cpu()[train_index], minlength=len(per_class)) > 0).all():
        return
    # At most n(m-1)/m of n images, a class of m gets at most m-1 held out, whatever the split's rounding.
    largest = int((len(labels) * (per_class - 1) // per_class.clamp(min=1)).min())
    advice = f"pass --val-size {largest} or less" if largest > 0 else "give every class two images or more"
    raise cli.UsageError(f"--val-size {val_size}: leaves a class with no training image; {advice}")


def has_bf16_units(device: torch.device) -> bool:
    """CUDA, or a CPU that computes bf16 natively (AMX tiles, or AVX512-BF16 as on AMD EPYC): there bf16 autocast
    trains AlexNet at 224 px faster than fp32 (benchmarks/README.md; an AMD EPYC with AVX512-BF16 and no AMX: 66
    images/s against 37). MPS trains in fp32."""
    return device.type == "cuda" or (device.type == "cpu" and any(
        getattr(torch.cpu, name, bool)() for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")))


def channels_last(device: torch.device, bf16: bool) -> bool:
    """CUDA's code path (NHWC tensors, the fused SGD): on CUDA, and in bf16 on the CPU, where oneDNN is fastest so."""
    return device.type == "cuda" or bf16


def prepare_model(model: AlexNet, params: list[nn.Parameter], args: argparse.Namespace, processes: Processes
                  ) -> tuple[nn.Module, torch.optim.Optimizer, bool]:
    """The network to train (DDP- and compile-wrapped as asked), its optimizer, and whether it trains in bf16."""
    device = processes.device
    bf16 = args.precision == "bf16" or (args.precision == "auto" and has_bf16_units(device))
    fast = channels_last(device, bf16)
    model.to(device, memory_format=torch.channels_last if fast else torch.contiguous_format)
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                                **({"fused": True} if fast else {}))
    if processes.distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        net = model
    if args.compile:
        net = torch.compile(net)
    return net, optimizer, bf16


def start_run(args: argparse.Namespace, stage: str, processes: Processes, model: AlexNet,
              trainable: list[nn.Parameter], images: data.ImageSet) -> Run:
    net, optimizer, bf16 = prepare_model(model, trainable, args, processes)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema)) if args.ema else None
    torch.manual_seed(args.seed + processes.rank)  # dropout: its own masks in each process
    augment = torch.Generator(device=processes.device).manual_seed(args.seed)
    return Run(args, stage, processes, model, net, optimizer, bf16, ema, augment, images.classes, images.stored_size,
               images.fingerprint, Path(args.out))


def stop_here(run: Run, progress: Progress, writer: CheckpointWriter, received: signal.Signals | None) -> None:
    """After a signal: the resume state is on disk, every process leaves, the command to continue is printed."""
    writer.wait()
    run.processes.barrier()
    received = received or signal.SIGTERM  # another process got the signal
    if run.processes.main:
        print(f"{run.stage}.py: stopped by {received.name} at {position(progress)}; resume with: "
              f"{resume_command(run)}", file=sys.stderr)
    run.processes.close()
    sys.exit(128 + received)


def resume_command(run: Run) -> str:
    world = run.processes.world
    launcher = "python" if world == 1 else f"torchrun --nproc_per_node={world}"
    return f"{launcher} {run.stage}.py --resume {side_files(run.out)['last']}"


# --------------------------------------------------------------------------- the loop


def learning_rate(args: argparse.Namespace, epoch: int, step: int, steps: int) -> float:
    """--lr after linear warm-up, then constant or cosine to zero at the last step; a function of the step alone."""
    progress = epoch + (step + 1) / steps  # epochs done after this step
    if progress <= args.warmup_epochs:
        return args.lr * progress / args.warmup_epochs
    if args.lr_schedule == "cosine":
        cosine_progress = (progress - args.warmup_epochs) / (args.epochs - args.warmup_epochs)
        return args.lr * 0.5 * (1 + math.cos(math.pi * cosine_progress))
    return args.lr


def train_step(net: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
               batch: int, args: argparse.Namespace, rng: torch.Generator, processes: Processes,
               bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on a global batch of `batch` uint8 images, of which `images` and `labels` are this process's
    share.

    Returns the summed loss and the number of correct predictions as device
    tensors, so the caller decides when to wait for them.
    """
    x = data.train_batch(images, args.image_size, rng, processes.share(), args.augment, args.cutout, batch)
    if channels_last(x.device, bf16):  # cuDNN's and oneDNN's fastest convolutions take NHWC
        x = x.contiguous(memory_format=torch.channels_last)
    y = labels
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = net(x)
    loss = F.cross_entropy(logits.float(), y, reduction="sum", label_smoothing=args.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    # the mean over the global batch: DDP averages the processes' gradients, hence the factor world
    (loss * (processes.world / batch)).backward()
    optimizer.step()
    return loss.detach(), (logits.argmax(1) == y).sum()


def train_one_epoch(run: Run, progress: Progress, images: data.ImageSet, stop: cli.StopSignal,
                    writer: CheckpointWriter) -> bool:
    """The steps of epoch `progress.epoch` from `progress.step` on; False when a signal stopped it (state saved).

    Loss, correct predictions and the first non-finite step are summed on the
    device: no step waits for the host.
    """
    args, processes = run.args, run.processes
    n = len(images.labels)
    steps = math.ceil(n / args.batch_size)
    run.model.train()
    if progress.perm is None:
        progress.perm = torch.randperm(n, generator=run.augment, device=processes.device)
        progress.running.copy_(torch.tensor(EPOCH_START))
    title = f"epoch {progress.epoch + 1}/{args.epochs}"
    line = cli.ProgressLine(title, n, done=progress.step * args.batch_size) if processes.main else None
    stopped = False
    # closed however the loop ends (a stop, an error): a streamed set's reading ahead ends with it
    batches = images.batches(progress.perm, progress.step, args.batch_size, processes.share())
    with contextlib.closing(batches):
        for step, (x, y) in zip(range(progress.step, steps), batches):
            for group in run.optimizer.param_groups:
                group["lr"] = learning_rate(args, progress.epoch, step, steps)
            batch = min(args.batch_size, n - step * args.batch_size)
            loss, correct = train_step(run.net, run.optimizer, x, y, batch, args, run.augment, processes, run.bf16)
            if run.ema is not None:
                run.ema.update_parameters(run.model)
            running = progress.running
            first_bad = torch.where((running[2] < 0) & ~torch.isfinite(loss), float(step), running[2])
            running.copy_(torch.stack([running[0] + loss, running[1] + correct, first_bad]))
            done = min(n, (step + 1) * args.batch_size)
            if line is not None and line.due(done):  # the loss so far: this process's share, scaled to all
                line.show(done, f", loss {running[0].item() * processes.world / done:.4f}")
            if processes.any(stop.received is not None) and step + 1 < steps:
                progress.step, stopped = step + 1, True
                break
    if line is not None:
        line.close()  # also on a stop: the stop's message starts a line of its own
    if stopped:
        save_resume_state(run, progress, writer)
    return not stopped


def epoch_totals(run: Run, progress: Progress, n: int) -> tuple[float, float]:
    """Mean training loss and accuracy of the epoch: the epoch's one wait for the device."""
    processes = run.processes
    totals = processes.reduce(progress.running[:2].clone())
    first_bad = processes.reduce(progress.running[2:].clone(), dist.ReduceOp.MAX if processes.world > 1 else None)
    (loss, correct), first_bad = totals.tolist(), first_bad.item()
    if first_bad >= 0:
        raise cli.UsageError(f"the training loss became {loss} at epoch {progress.epoch + 1}, step {int(first_bad) + 1}; "
                         f"lower --lr (now {run.args.lr}) and start again")
    return loss / n, correct / n


def evaluate(model: nn.Module, images: data.ImageSet, args: argparse.Namespace) -> dict:
    """Predict's evaluation path on a split; under torchrun every process evaluates all of it (same result)."""
    return classification_report(split_logits(model, images, args), images.labels, images.classes)


def split_logits(model: nn.Module, images: data.ImageSet, args: argparse.Namespace, title: str | None = None
                 ) -> torch.Tensor:
    with contextlib.closing(images.batches(None, 0, args.batch_size)) as batches:
        return compute_logits(model, (x for x, _ in batches), args.image_size, args.tta, title, len(images))


def start_competes(run: Run, progress: Progress, val_images: data.ImageSet, writer: CheckpointWriter) -> None:
    """Fine-tuning: the starting weights are validated as epoch 0 and kept if no epoch beats them."""
    val = evaluate(run.evaluated, val_images, run.args)
    progress.best = {"val_acc": val["accuracy"], "epoch": 0}
    if run.processes.main:
        metrics = {"epoch": 0, "val_loss": val["loss"], "val_acc": val["accuracy"]}
        writer.save(checkpoint_of(run, run.evaluated, 0, metrics), run.out)
        print(f"epoch   0/{run.args.epochs}  {'(the starting weights)':25}val_loss {val['loss']:.4f}  "
              f"val_acc {val['accuracy']:6.2%}  *best", flush=True)


def end_epoch(run: Run, progress: Progress, train_images: data.ImageSet, val_images: data.ImageSet,
              started: float, writer: CheckpointWriter) -> None:
    """Validate, log, keep the weights if validation improved, and write the resume state."""
    n = len(train_images.labels)
    train_loss, train_acc = epoch_totals(run, progress, n)
    train_seconds = time.perf_counter() - started
    val = evaluate(run.evaluated, val_images, run.args)
    epoch = progress.epoch + 1
    progress.history.append({"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
                             "val_loss": val["loss"], "val_acc": val["accuracy"],
                             "lr": run.optimizer.param_groups[0]["lr"], "images_per_s": n / train_seconds,
                             "epoch_s": time.perf_counter() - started})
    improved = val["accuracy"] > progress.best["val_acc"]
    best = None
    if improved:
        progress.best = {"val_acc": val["accuracy"], "epoch": epoch}
        best = checkpoint_of(run, run.evaluated, epoch, progress.history[-1])
    progress.epoch, progress.step, progress.perm = epoch, 0, None
    save_resume_state(run, progress, writer, finished=epoch == run.args.epochs, best=best)
    if run.processes.main:
        write_csv(side_files(run.out)["csv"], progress.history)
        write_picture(side_files(run.out)["curves"], "learning curves", learning_curves(
            progress.history, progress.best["epoch"], f"{run.stage}: {run_name(run.out).name}, {epoch} of "
            f"{run.args.epochs} epochs"))
        print_epoch(progress.history, run.args.epochs, improved)
        tell_if_stdout_lost(run)


def tell_if_stdout_lost(run: Run) -> None:
    """A closed stdout (`| head`), or a full disk under `> log`, does not stop the training: said once, on stderr.

    What goes to stdout are results: the start line, each epoch's line, the test report. Progress lines and
    diagnostics go to stderr (tqdm's convention), so `> log` holds only the results.
    """
    stdout = sys.stdout
    if getattr(stdout, "lost", None) is None or stdout.lost_told:
        return
    stdout.lost_told = True
    print(f"{run.stage}.py: cannot write to stdout any more ({stdout.lost.strerror or stdout.lost}); training goes "
          f"on, each epoch is logged in {side_files(run.out)['csv']}", file=sys.stderr)


def print_epoch(history: list[dict], epochs: int, improved: bool) -> None:
    row = history[-1]
    remaining = (epochs - row["epoch"]) * sum(r["epoch_s"] for r in history) / len(history)
    print(f"epoch {row['epoch']:3d}/{epochs}  loss {row['train_loss']:.4f}  acc {row['train_acc']:6.2%}  "
          f"val_loss {row['val_loss']:.4f}  val_acc {row['val_acc']:6.2%}  {row['images_per_s']:7.0f} img/s  "
          f"{row['epoch_s']:6.1f} s  eta {cli.clock(remaining)}"
          + ("  *best" if improved else ""), flush=True)


def train(args: argparse.Namespace, given: set[str], stage: str,
          new_model: Callable[[argparse.Namespace, list[str]], AlexNet] | None,
          trainable: Callable[[argparse.Namespace, AlexNet], list[nn.Parameter]],
          starting_weights_compete: bool = False) -> dict | None:
    """Train, keep the best validation epoch, then evaluate the test split once. Returns the test report.

    `given` names the flags set on the command line; `new_model(args, classes)`
    builds the model of a fresh run (None where only a resume is possible); `trainable(args, model)` returns the
    parameters to train. With `starting_weights_compete` the starting weights
    are validated as epoch 0 (see `start_competes`). Under torchrun every
    process runs this; only the first prints and writes.
    """
    if args.resume is not None and args.overwrite:
        raise cli.UsageError(f"--overwrite with --resume {args.resume}: --overwrite starts a run afresh, --resume "
                         "continues one; pass one of them")
    state = None if args.resume is None else read_resume_state(args.resume, stage)
    if state is not None:
        args = in_run_folder(resumed_args(args, given, state), given, state)
        check_best_kept(args, state)
    processes = Processes(args.device)
    if processes.main:
        warn_about_warmup(args)
    if state is not None and len(state["rng"]["processes"]) != processes.world:
        world = len(state["rng"]["processes"])
        raise cli.UsageError(f"--resume {args.resume}: the run had {world} processes, this has {processes.world}; "
                         f"resume it with torchrun --nproc_per_node={world}")
    if processes.main:
        check_out(args.out)
    out = Path(args.out)
    with OutLock(out) if processes.main else contextlib.nullcontext():
        if state is None and processes.main:
            check_no_run_there(args, stage)
        train_images, val_images, test_images = prepare_data(args, processes)
        torch.manual_seed(args.seed)
        if state is None:
            model = new_model(args, train_images.classes)
        else:
            check_same_data(args, state, train_images)
            model = AlexNet(**state["model_args"])
        run = start_run(args, stage, processes, model, trainable(args, model), train_images)
        if state is None:
            progress = Progress(torch.tensor(EPOCH_START, device=processes.device))
        else:
            progress = restore(run, state)
        if state is not None:
            announce_resume(run, progress, state)
        print_start(run, train_images, val_images, test_images)
        fit(run, progress, train_images, val_images, starting_weights_compete and state is None)
        processes.close()
        return test_or_stop(run, progress, val_images, test_images) if processes.main else None


def fit(run: Run, progress: Progress, train_images: data.ImageSet, val_images: data.ImageSet,
        starting_weights_compete: bool) -> None:
    """The epoch loop: train, validate, keep the best, write the resume state; a signal stops it with that saved."""
    with cli.StopSignal() as stop:
        try:
            with CheckpointWriter() as writer:
                if starting_weights_compete:
                    start_competes(run, progress, val_images, writer)
                while progress.epoch < run.args.epochs:
                    started = time.perf_counter()
                    if not train_one_epoch(run, progress, train_images, stop, writer):
                        stop_here(run, progress, writer, stop.received)
                    end_epoch(run, progress, train_images, val_images, started, writer)
                    if run.processes.any(stop.received is not None) and progress.epoch < run.args.epochs:
                        stop_here(run, progress, writer, stop.received)
        except KeyboardInterrupt:  # a second signal; leaving the writer's block has put its saves on disk
            stopped_at_once(run, progress, writer, stop.received or signal.SIGINT)


def stopped_at_once(run: Run, progress: Progress, writer: CheckpointWriter, received: signal.Signals) -> None:
    """Say what a second signal leaves: the newest resume state saved before it, which a resume continues."""
    if run.processes.main:
        if progress.saved is None or writer.error is not None:
            print(f"{run.stage}.py: stopped at once by a second {received.name}; no resume state was saved",
                  file=sys.stderr)
        else:
            print(f"{run.stage}.py: stopped at once by a second {received.name}; the resume state at "
                  f"{progress.saved} is saved: resume with: {resume_command(run)}", file=sys.stderr)
    sys.exit(128 + received)


def check_same_data(args: argparse.Namespace, state: dict, train_images: data.ImageSet) -> None:
    """The saved order and sums index the training images as they were: a changed folder cannot continue."""
    if state.get("data_fingerprint", train_images.fingerprint) != train_images.fingerprint:
        raise cli.UsageError(f"--resume {args.resume}: the images in {args.data_dir}/train changed since the run "
                         "started (added, removed or modified files); restore them, or start a new run")


def announce_resume(run: Run, progress: Progress, state: dict) -> None:
    if not run.processes.main:
        return
    print(f"resuming {run.stage} from {run.args.resume}: epoch {progress.epoch + 1}, step {progress.step}; flags "
          "from the checkpoint, --epochs, --device, --stream and --data-dir from the command line when given")
    if state.get("finished") and progress.epoch >= run.args.epochs:
        print(f"this run already finished {progress.epoch} epochs (pass a larger --epochs to train further): "
              "evaluating the test split again with its best validation epoch's weights")


def print_start(run: Run, train_images: data.ImageSet, val_images: data.ImageSet, test_images: data.ImageSet) -> None:
    if not run.processes.main:
        return
    world = run.processes.world
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    print(f"{run.stage}: {len(train_images.labels)} training, {len(val_images.labels)} validation, "
          f"{len(test_images.labels)} test images, {len(run.classes)} classes, stored at {run.stored_size} px, "
          f"trained at {run.args.image_size} px, on {run.processes.device}"
          + (f" x {world} processes ({dist.get_backend()})" if run.processes.distributed else "")
          + f", {'bf16 autocast, channels_last, fused SGD' if run.bf16 else 'fp32'} (--precision {run.args.precision})"
          + f"{', compiled' if run.args.compile else ''}"
          + f", {trainable:,} trainable parameters")


# --------------------------------------------------------------------------- the test, once


def test_or_stop(run: Run, progress: Progress, val_images: data.ImageSet, test_images: data.ImageSet) -> dict:
    """The test; a signal during it stops at once, the trained run being saved already."""
    with cli.StopSignal(at_once=True) as stop:
        try:
            return test_once(run, progress, val_images, test_images)
        except KeyboardInterrupt:
            received = stop.received or signal.SIGINT
    print(f"{run.stage}.py: stopped by {received.name} during the test evaluation; the trained run is saved, get "
          f"its test report with: {resume_command(run)}", file=sys.stderr)
    sys.exit(128 + received)


def test_once(run: Run, progress: Progress, val_images: data.ImageSet, test_images: data.ImageSet) -> dict:
    """The best validation epoch's weights on the test split: the only look at it, printed and saved. The
    temperature that calibrates their probabilities is fitted on the validation split (Guo et al. 2017) and kept in
    the checkpoint: predict.py's probabilities use it."""
    best, files, device = progress.best, side_files(run.out), run.processes.device
    final = load_checkpoint(run.out, map_location=device)
    run.evaluated.load_state_dict(final["model"])
    logits = split_logits(run.evaluated, data.place(test_images, device, run.args.stream), run.args, title="test")
    temperature = fit_temperature(split_logits(run.evaluated, val_images, run.args), val_images.labels)
    test = classification_report(logits, test_images.labels, run.classes)
    test |= calibration_report(logits, test_images.labels, temperature)
    print(f"best validation accuracy {best['val_acc']:.2%} at epoch {best['epoch']}"
          f"{' (the starting weights)' if best['epoch'] == 0 else ''}; the test split, evaluated once with those "
          "weights:")
    print_report("test", test, run.classes)
    test |= {"checkpoint": str(run.out), "epoch": best["epoch"], "val_acc": best["val_acc"], "code": code_version()}
    save_checkpoint(final | {"test_metrics": test, "temperature": temperature}, run.out)
    write_text(files["test"], "test report", json.dumps(test, indent=2) + "\n")
    write_picture(files["confusion"], "confusion matrix picture", confusion_picture(
        test["confusion_matrix"], run.classes, f"{run.stage}: {run_name(run.out).name}, the test split "
        f"({test['accuracy']:.1%} right; shade: share of the true class)"))
    print(f"saved {run.out} (best validation epoch), {files['last']} (resume state), {files['csv']} and "
          f"{files['curves']} (each epoch), {files['test']} and {files['confusion']} (the test)")
    return test


# --------------------------------------------------------------------------- pretrain.py


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
        raise cli.UsageError(f"--init {source}: not a state dict (it holds a {type(weights).__name__}, not names mapped to "
                         "tensors); pass a torchvision AlexNet state dict or a checkpoint of this project")
    return weights


def new_model(args: argparse.Namespace, classes: list[str]) -> AlexNet:
    """A fresh AlexNet, or one started from --init's tensors where names and shapes match."""
    model = AlexNet(num_classes=len(classes))
    if args.init is not None:
        loaded, skipped = load_matching(model, initial_weights(args.init))
        print(f"--init {args.init}: loaded {len(loaded)} tensors; kept fresh (name or shape differs): "
              f"{', '.join(skipped) or 'none'}")
    return model


def every_parameter(args: argparse.Namespace, model: AlexNet) -> list[nn.Parameter]:
    return list(model.parameters())


def build_parser() -> argparse.ArgumentParser:
    """pretrain.py's flags, also the `invoke pretrain` task's."""
    parser = make_parser(__doc__.split("\n\n")[0], "pretrain")
    parser.add_argument("--init", default=None, metavar="PATH|imagenet",
                        help="start from a torchvision AlexNet state dict, tensors matched by name and shape "
                             "(default: from scratch)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    cli.guard_output()
    args = parser.parse_args(argv)
    given = given_flags(parser, argv)
    cli.report_errors("pretrain.py", args.batch_size, lambda: train(args, given, "pretrain", new_model, every_parameter))


if __name__ == "__main__":
    main()
