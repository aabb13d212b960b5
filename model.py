"""AlexNet as the reference trained it, in torchvision's layout, plus checkpoint I/O.

Imports only torch, so this file can be copied into another project on its own.
The layer names match torchvision's `models/alexnet.py` (features / avgpool /
classifier), so torchvision state dicts load by name; only the classifier
differs (4096 -> 1024 -> num_classes instead of 4096 -> 4096 -> 1000).
"""
import glob
import os
import queue
import sys
import tempfile
import threading

import torch
from torch import nn


class AlexNet(nn.Module):
    def __init__(self, num_classes: int = 10, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 1024),
            nn.ReLU(inplace=True),
            nn.Linear(1024, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


# The smallest input for which every pooling layer still has a 3x3 window.
MIN_IMAGE_SIZE = 63

# Wrappers add these to parameter names: DataParallel/DDP and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


# What every checkpoint carries: weights, what rebuilds the model, and how its inputs were made.
CHECKPOINT_KEYS = ("model", "model_args", "classes", "image_size", "stored_size")


class CheckpointError(Exception):
    """A checkpoint file that cannot be used; the message says which and why."""


def unwrap_state_dict(state_dict: dict) -> dict:
    """Strip the `module.` / `_orig_mod.` prefixes that wrappers add."""
    unwrapped = {}
    for name, tensor in state_dict.items():
        while name.startswith(WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        unwrapped[name] = tensor
    return unwrapped


def load_matching(model: nn.Module, state_dict: dict) -> tuple[list[str], list[str]]:
    """Load every tensor whose name and shape match; return (loaded, skipped) names.

    Made for torchvision's AlexNet state dicts (e.g. its ImageNet weights): the
    convolutions and classifier[1] match, the differently sized classifier
    layers are skipped and keep their fresh initialisation.
    """
    own = model.state_dict()
    state_dict = unwrap_state_dict(state_dict)
    matching = {n: t for n, t in state_dict.items() if n in own and own[n].shape == t.shape}
    skipped = sorted(set(state_dict) - set(matching))
    model.load_state_dict(matching, strict=False)
    return sorted(matching), skipped


def resolve_device(name: str | None) -> torch.device:
    """`None` means CUDA when there is one, else the CPU with a warning."""
    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        print("warning: CUDA is not available, running on the CPU (slow); pass --device cpu to silence this", file=sys.stderr)
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CheckpointError(f"--device {name}: not a device name; use cuda, cuda:N or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def save_checkpoint(checkpoint: dict, path: str | os.PathLike) -> None:
    """Write atomically: a crash or SIGKILL mid-write leaves the previous file intact.

    The temporary file sits beside the target; one left by a killed writer is
    removed by the next save (one writer per path, as the scripts do).
    """
    directory, name = os.path.split(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        for stale in glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(name)}.*.tmp")):
            os.unlink(stale)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise CheckpointError(f"{path}: cannot write the checkpoint ({e.strerror or e}); the previous one is "
                                  "untouched: free disk space, or choose a writable --out") from None
        raise


def to_cpu(obj):
    """A copy of a checkpoint with every tensor copied to the CPU: training may go on changing the originals."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: to_cpu(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(value) for value in obj)
    return obj


class CheckpointWriter:
    """Writes checkpoints in order on a background thread, so training does not wait for the disk.

    `save` copies the checkpoint's tensors to the CPU at once (what is written is
    the state at the call) and returns; `wait` blocks until everything queued is
    written and raises the first error a write met.
    """

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self.run, name="checkpoint-writer", daemon=True)
        self.thread.start()

    def run(self) -> None:
        while True:
            checkpoint, path = self.queue.get()
            try:
                if self.error is None:
                    save_checkpoint(checkpoint, path)
            except BaseException as e:  # handed to the training thread at its next save or wait
                self.error = e
            finally:
                self.queue.task_done()

    def save(self, checkpoint: dict, path: str | os.PathLike) -> None:
        self.raise_error()
        self.queue.put((to_cpu(checkpoint), path))

    def wait(self) -> None:
        self.queue.join()
        self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        """Every queued checkpoint is on disk when the block ends, by an error too; a write's error is raised."""
        self.queue.join()
        if kind is None:
            self.raise_error()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load with weights_only=True: tensors and plain containers, never arbitrary code."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file; check the path or train first")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt or unsafe file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a loadable checkpoint ({reason}); re-train or pass another file") from None
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint] if isinstance(checkpoint, dict) else CHECKPOINT_KEYS
    if missing:
        raise CheckpointError(f"{path}: not a checkpoint of this project (lacks {', '.join(missing)}); "
                              "pass a file written by pretrain.py or finetune.py")
    return checkpoint


def model_from_checkpoint(checkpoint: dict, path: str | os.PathLike = "checkpoint") -> AlexNet:
    model = AlexNet(**checkpoint["model_args"])
    try:
        model.load_state_dict(unwrap_state_dict(checkpoint["model"]))
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{path}: weights do not fit AlexNet({checkpoint['model_args']}): {' '.join(first[:2])}") from None
    return model
