"""AlexNet as the reference trained it, in torchvision's layout, and reading a checkpoint back.

Imports only torch, so this file can be copied into another project on its own:

    checkpoint = load_checkpoint("pretrain.pt")
    model = model_from_checkpoint(checkpoint)      # AlexNet with the trained weights
    classes = checkpoint["classes"]

Its input, as its evaluation makes it from the keys it holds: the RGB image (upright by its EXIF, transparency over
white), its shorter side resized to `stored_size` (Pillow's bilinear) and its centre square cut, 0 ... 255; that
resized to r = int(image_size * eval_resize) px square (eval_resize 256 / 224, older checkpoints lack it; bilinear,
as torch's interpolate; where it shrinks, each pixel the mean of ceil(stored_size / r) samples, as torchvision's
roi_align with aligned=True), its centre image_size square cut (at round((r - image_size) / 2)), divided by 255 and
normalised by `mean` and `std`. Its probabilities: softmax(logits / temperature) (1 if absent), the logits averaged
with the mirror image's where `tta`.

The layer names match torchvision's `models/alexnet.py` (features / avgpool / classifier), so torchvision state dicts
load by name; only the classifier differs (4096 -> 1024 -> num_classes instead of 4096 -> 4096 -> 1000). `hidden` sets
its two hidden widths: smaller ones train faster on a CPU or a small set.
"""
import inspect
import os
import pickle
import re
import stat
import zipfile

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


REFERENCE_HIDDEN = (4096, 1024)  # the classifier's two hidden widths in the reference


class AlexNet(nn.Module):
    def __init__(self, num_classes: int = 10, dropout: float = 0.5, hidden: tuple[int, int] = REFERENCE_HIDDEN) -> None:
        super().__init__()
        self.features = nn.Sequential(  # a line a layer: convolution (kernel size, stride, padding), its pooling
            nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout), nn.Linear(256 * 6 * 6, hidden[0]), nn.ReLU(inplace=True),
            nn.Dropout(p=dropout), nn.Linear(hidden[0], hidden[1]), nn.ReLU(inplace=True),
            nn.Linear(hidden[1], num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class EMA(AveragedModel):
    """An exponential moving average of a model's weights: AveragedModel with get_ema_multi_avg_fn's state and
    arithmetic, bit for bit for a model without buffers (AlexNet), without its wait for the device at each update (it
    copied its CPU step count there, a blocking copy: on CUDA the host waited for every step queued on the GPU)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__(model)
        self.decay = decay

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        averaged, current = list(self.module.parameters()), [p.detach() for p in model.parameters()]
        if self.n_averaged == 0:  # a CPU tensor: read without waiting for the device
            torch._foreach_copy_(averaged, current)
        else:
            torch._foreach_lerp_(averaged, current, 1 - self.decay)
        self.n_averaged += 1


MIN_IMAGE_SIZE = 63  # the smallest input for which every pooling layer still has a 3x3 window
TEMPERATURE_RANGE = (0.05, 20.0)  # a fitted temperature is kept within these (below, float32 logits / T overflow)
WRAPPER_PREFIXES = re.compile(r"(module\.|_orig_mod\.)*")  # what DataParallel/DDP and torch.compile add to names


# What every checkpoint carries: weights, what rebuilds the model, how its inputs were made (load_checkpoint checks).
CHECKPOINT_KEYS = ("model", "model_args", "classes", "image_size", "stored_size")


def checkpoint_dict(model: AlexNet, classes: list[str], image_size: int, stored_size: int, **described) -> dict:
    """CHECKPOINT_KEYS, then what `described` adds about the run; plain types only: weights_only loading reads them."""
    return {"model": unwrap_state_dict(model.state_dict()),
            "model_args": {"num_classes": len(classes), "dropout": model.classifier[0].p,
                           "hidden": (model.classifier[1].out_features, model.classifier[4].out_features)},
            "classes": list(classes), "image_size": image_size, "stored_size": stored_size} | described


ALEXNET_ARGS = tuple(inspect.signature(AlexNet).parameters)  # all a checkpoint's model_args may hold


class CheckpointError(Exception):
    """A checkpoint file that cannot be used; the message says which and why."""


NOT_A_CHECKPOINT = ("not a checkpoint file (not a PyTorch zip archive, or damaged); pass a checkpoint that this "
                    "project's training wrote")


def check_checkpoint_file(path: str | os.PathLike) -> None:
    """A regular file, or a one-line error: a FIFO would hang torch.load, a folder or device is no checkpoint."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file; check the path, or train a model first") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e}); pass a readable checkpoint file") from None
    if stat.S_ISDIR(mode):
        raise CheckpointError(f"{path}: is a folder; pass a checkpoint file, e.g. {os.path.join(path, 'pretrain.pt')}")
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path}: not a regular file (a device, FIFO or socket); pass a checkpoint file")


def is_exported_program(path: str | os.PathLike) -> bool:
    """A torch.export archive (export.py's), told by its marker file; `path` is a regular file, checked first."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/archive_format") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def unwrap_state_dict(state_dict: dict) -> dict:
    return {name[WRAPPER_PREFIXES.match(name).end():]: tensor for name, tensor in state_dict.items()}


def load_matching(model: nn.Module, state_dict: dict) -> tuple[list[str], list[str]]:
    """Load every tensor whose name and shape match; return (loaded, skipped) names. For torchvision's ImageNet
    weights: the convolutions and classifier[1] match, the other layers keep their fresh initialisation."""
    own = model.state_dict()
    state_dict = unwrap_state_dict(state_dict)
    matching = {n: t for n, t in state_dict.items() if n in own and own[n].shape == t.shape}
    model.load_state_dict(matching, strict=False)
    return sorted(matching), sorted(set(state_dict) - set(matching))


def load_tensors(path: str | os.PathLike, map_location="cpu"):
    """What a file saved with torch.save holds, loaded with weights_only=True: tensors and plain containers, never
    arbitrary code; any failure is one line naming the file."""
    check_checkpoint_file(path)
    if not zipfile.is_zipfile(path):  # a text file read as a pickle could even be blamed for "running code"
        raise CheckpointError(f"{path}: {NOT_A_CHECKPOINT}")
    if is_exported_program(path):
        raise CheckpointError(f"{path}: an exported program (export.py), not a checkpoint; pass the checkpoint it "
                              "was exported from")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # many types for damage (KeyError for text); torch's text may advise weights_only=False
        if isinstance(e, pickle.UnpicklingError) and "GLOBAL " in str(e):  # torch's only sign of a blocked class
            raise CheckpointError(f"{path}: not a loadable checkpoint: it holds objects other than tensors and plain "
                                  "data, refused because loading them could run code; pass a checkpoint that "
                                  "this project's training wrote") from None
        raise CheckpointError(f"{path}: {NOT_A_CHECKPOINT}") from None


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """One of our checkpoints (see load_tensors), its pieces checked against each other (one class name per output of
    the head, sizes the model can take), its evaluation values usable (evaluation_problem) and its weights finite (a
    diverged training's predict nothing)."""
    checkpoint = load_tensors(path, map_location)
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path}: not a checkpoint of this project (lacks {', '.join(missing)}); "
                              "pass a checkpoint that its training wrote")
    problem = (model_args_problem(checkpoint["model_args"]) or names_and_sizes_problem(checkpoint)
               or evaluation_problem(checkpoint))
    if problem is not None:
        raise CheckpointError(f"{path}: inconsistent checkpoint: {problem}; re-train or pass another file")
    for key in ("model", "ema"):
        names = non_finite(checkpoint.get(key))
        if names:
            raise CheckpointError(f"{path}: its {'EMA ' * (key == 'ema')}weights hold NaN or infinite values "
                                  f"({few(names)}): the training that wrote them diverged; re-train with a smaller "
                                  "learning rate or pass another file")
    return checkpoint


def recorded_path(checkpoint: dict, path: str) -> str:
    """A path its run was given (its data folder, the checkpoint it started from) as that run meant it: a relative
    one is in the folder the run started in, kept as `cwd` (a checkpoint from before it was kept: this folder)."""
    return os.path.join(checkpoint.get("cwd", ""), path)


def non_finite(weights) -> list[str]:
    if not isinstance(weights, dict):
        return []
    return [name for name, tensor in weights.items() if isinstance(tensor, torch.Tensor)
            and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def names_and_sizes_problem(checkpoint: dict) -> str | None:
    """Class names that do not fit the head (model_args already checked), or sizes the model cannot take."""
    classes, num_classes = checkpoint["classes"], checkpoint["model_args"]["num_classes"]
    if not isinstance(classes, list) or not all(isinstance(name, str) for name in classes):
        return "its classes are not a list of names"
    if len(classes) != num_classes or len(set(classes)) != len(classes):
        return f"it names {len(classes)} classes ({len(set(classes))} different) for a head of {num_classes} outputs"
    if not (isinstance(checkpoint["image_size"], int) and checkpoint["image_size"] >= MIN_IMAGE_SIZE
            and isinstance(checkpoint["stored_size"], int) and checkpoint["stored_size"] > 0):
        return (f"image_size {checkpoint['image_size']!r} (at least {MIN_IMAGE_SIZE}) or stored_size "
                f"{checkpoint['stored_size']!r} is not a size")
    return None


def evaluation_problem(checkpoint: dict) -> str | None:
    """Evaluation values its input and probabilities cannot be made with (a checkpoint from before them lacks them)."""
    resize, temperature = checkpoint.get("eval_resize", 1.0), checkpoint.get("temperature", 1.0)
    if not (is_number(resize, (int, float)) and 1 <= resize < float("inf")):
        return f"eval_resize {resize!r} is not a finite factor of at least 1 (the resize before the centre crop)"
    if not (is_number(temperature, (int, float)) and TEMPERATURE_RANGE[0] <= temperature <= TEMPERATURE_RANGE[1]):
        return f"temperature {temperature!r} is not a number from {TEMPERATURE_RANGE[0]} to {TEMPERATURE_RANGE[1]}"
    if not isinstance(checkpoint.get("tta", False), bool):
        return f"tta {checkpoint['tta']!r} is not True or False"
    return None


def model_args_problem(model_args) -> str | None:
    """What keeps `AlexNet(**model_args)` from building the head the checkpoint describes, or None."""
    if not isinstance(model_args, dict):
        return f"model_args {model_args!r} are not a dict of AlexNet's arguments"
    unknown = sorted(map(repr, set(model_args) - set(ALEXNET_ARGS)))
    if unknown:
        return (f"model_args {model_args!r} hold {', '.join(unknown)}, not arguments of AlexNet "
                f"({', '.join(ALEXNET_ARGS)})")
    num_classes, dropout = model_args.get("num_classes"), model_args.get("dropout", 0.5)
    if not is_number(num_classes, int) or num_classes < 1:
        return f"model_args {model_args!r} do not say how many classes the head has (num_classes, an integer >= 1)"
    if not is_number(dropout, (int, float)) or not 0 <= dropout < 1:
        return f"model_args {model_args!r} hold a dropout that is not a probability in [0, 1)"
    hidden = model_args.get("hidden", REFERENCE_HIDDEN)
    if not (isinstance(hidden, (tuple, list)) and len(hidden) == 2 and all(is_number(w, int) and w >= 1
                                                                           for w in hidden)):
        return f"model_args {model_args!r} hold hidden widths that are not two integers >= 1"
    return None


def is_number(value, types) -> bool:  # bool is an int to Python, never a class count or a probability here
    return isinstance(value, types) and not isinstance(value, bool)


def model_from_checkpoint(checkpoint: dict, path: str | os.PathLike = "checkpoint") -> AlexNet:
    """The AlexNet a checkpoint describes, with its weights; `path` names it in errors."""
    model = AlexNet(**checkpoint["model_args"])
    if not isinstance(checkpoint["model"], dict):
        raise CheckpointError(f"{path}: its model is a {type(checkpoint['model']).__name__}, not a state dict of "
                              "tensors; re-train or pass another file")
    weights = unwrap_state_dict(checkpoint["model"])
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        why = misfit(model.state_dict(), weights) or str(e).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{path}: weights do not fit AlexNet({checkpoint['model_args']}): {why}; the file "
                              "was changed or written by other code: re-train or pass another file") from None
    return model


def misfit(own: dict, given: dict) -> str:
    """Which tensor names are missing, unexpected or shaped otherwise, a few of each: a full list runs to pages."""
    missing, unexpected = sorted(set(own) - set(given)), sorted(set(given) - set(own))
    shaped = [name for name in own if name in given and getattr(given[name], "shape", None) != own[name].shape]
    return ", ".join(f"{what} {few(names)}" for what, names in (
        ("missing", missing), ("unexpected", unexpected), ("not of this model's shape", shaped)) if names)


def few(names: list[str], at_most: int = 3) -> str:
    return ", ".join(names[:at_most]) + (f" and {len(names) - at_most} more" if len(names) > at_most else "")
