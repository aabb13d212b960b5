"""CIFAR-10 download and class-folder data, decoded once and augmented on the device.

    python data.py download [--root data/cifar10] [--source URL|PATH] [--md5 HEX]

A data set is a folder with `train/` and `test/`, each holding one folder per
class (torchvision ImageFolder conventions: class folders sorted by name,
hidden files and non-images ignored). Each split is decoded once into a uint8
tensor N x 3 x S x S, cached in `<data-dir>/.cache/` and rebuilt whenever the
files change. Augmentation and the evaluation transform run batched on
whatever device holds that tensor.
"""
import argparse
import collections
import errno
import fcntl
import functools
import glob
import hashlib
import io
import lzma
import os
import pickle
import shutil
import stat
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import zipfile
import zlib
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.datasets.utils import check_integrity, download_url
from torchvision.ops import roi_align

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_DIR = "cifar-10-batches-py"  # the folder inside the official tarball
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MEAN = (0.485, 0.456, 0.406)  # ImageNet normalisation, as the reference
STD = (0.229, 0.224, 0.225)
EVAL_RESIZE = 256 / 224  # evaluation resizes to 256/224 of the crop, then centre-crops
MAX_STORED_SIZE = 256  # larger photos are stored at 256 px, enough for 224 crops
CACHE_VERSION = 1
# An archive whose members declare more is refused (a zip bomb unpacks a few MB to terabytes); a data set that large
# would not fit in memory once decoded anyway.
MAX_UNPACKED_BYTES = 16 * 2**30
WORKERS = min(8, len(os.sched_getaffinity(0)))


class DataError(Exception):
    """Data that cannot be used (a folder, an image, an archive, a download); the message names it and what to do.

    Given apart, `problem` (what is wrong) can be reported again with other advice by a caller that knows better.
    """

    def __init__(self, problem: str, fix: str = "") -> None:
        super().__init__(f"{problem}; {fix}" if fix else problem)
        self.problem = problem


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each default, except None: those flags' help says what happens instead."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


# --------------------------------------------------------------------------- images

def load_image(path: str | os.PathLike, size: int | None = None) -> tuple[Image.Image, int]:
    """Any image Pillow reads, as RGB, upright (EXIF), transparency over white.

    Returns the image and its original shorter side. `size` lets a JPEG decode
    at a reduced scale that is still at least size x size.
    """
    with Image.open(path) as img:
        shorter_side = min(img.size)
        if size is not None and img.format == "JPEG":
            img.draft("RGB", (size, size))
        img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I") or img.mode == "F":  # 16/32-bit grey: scale, do not clip
        pixels = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or pixels.max() > 255:
            pixels = pixels / 257.0
        img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), shorter_side
    return img.convert("RGB"), shorter_side


def decode(path: str | os.PathLike, size: int) -> tuple[np.ndarray, int]:
    """An image as a size x size x 3 uint8 array (shorter side to size, centre crop), and its shorter side.

    The cache builder and predict.py both use this, so a single image is
    prepared exactly like the images a model was trained and evaluated on.
    A file that cannot be read raises DataError naming it.
    """
    try:
        img, shorter_side = load_image(path, size)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{shown(path)}: cannot read this image ({e}); remove or replace the file") from None
    if img.size != (size, size):
        w, h = img.size
        scale = size / min(w, h)
        w, h = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((w, h), Image.BILINEAR)  # Pillow antialiases when shrinking
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return np.array(img, dtype=np.uint8), shorter_side


def shown(path: str | os.PathLike) -> str:
    """A path as text any stream prints: bytes of a name that are not UTF-8 (made on another system) as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def special_kind(mode: int) -> str:
    """What a file that is no regular file, folder or link is, from its st_mode."""
    kinds = {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFIFO: "a FIFO",
             stat.S_IFSOCK: "a socket"}
    return kinds.get(stat.S_IFMT(mode), "a special file")


def is_image_file(path: Path) -> bool:
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


# --------------------------------------------------------------------------- class folders

@dataclass
class ImageSet:
    images: torch.Tensor  # N x 3 x S x S uint8
    labels: torch.Tensor  # N int64
    classes: list[str]
    fingerprint: str = ""  # of the files decoded (names, sizes, times), kept by a subset: they are its source

    def subset(self, indices: torch.Tensor) -> "ImageSet":
        return ImageSet(self.images[indices], self.labels[indices], self.classes, self.fingerprint)

    def to(self, device: torch.device) -> "ImageSet":
        return ImageSet(self.images.to(device), self.labels.to(device), self.classes, self.fingerprint)

    @property
    def stored_size(self) -> int:
        return self.images.shape[-1]


def scan_class_folders(root: Path, name: str | None = None) -> tuple[list[str], list[tuple[Path, int]]]:
    """ImageFolder's layout: one folder per class, sorted; hidden and non-image files skipped.

    `name` is what messages call `root` (default: its path).
    """
    name = name or shown(root)
    if not root.is_dir():
        raise DataError(f"{name}: no such folder", "download the data (python data.py download) or pass --data-dir")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{name}: no class folders inside", f"expected {name}/<class>/<image> files")
    samples = []
    for label, folder in enumerate(classes):
        files = sorted(p for p in (root / folder).rglob("*") if is_image_file(p) and p.is_file())
        if not files:
            raise DataError(f"{name}/{shown(folder)}: class folder has no images ({', '.join(IMAGE_EXTENSIONS)})",
                            "add images or remove the folder")
        samples += [(p, label) for p in files]
    if len(classes) == 1:  # training would reach 100 % by always answering the one class
        raise DataError(f"{name}: only one class folder ({shown(classes[0])})",
                        "a classifier needs at least two: add a folder of images for each other class")
    return classes, samples


def scan_dataset(data_dir: Path, name: str | None = None) -> dict[str, tuple[list[str], list[tuple[Path, int]]]]:
    """train/ and test/ scanned (see scan_class_folders), checked to have the same class folders."""
    name = name or shown(data_dir)
    for split in ("train", "test"):
        if not (data_dir / split).is_dir():
            raise DataError(f"{name}: no {split}/ folder", "a data folder holds train/<class>/ and test/<class>/ "
                            "(python data.py download makes one for CIFAR-10)")
    scans = {split: scan_class_folders(data_dir / split, f"{name}/{split}") for split in ("train", "test")}
    train, test = scans["train"][0], scans["test"][0]
    if train != test:
        only_train, only_test = sorted(set(train) - set(test)), sorted(set(test) - set(train))
        raise DataError(f"{name}: train/ and test/ have different class folders "
                        f"(only in train: {only_train or 'none'}, only in test: {only_test or 'none'})",
                        "make them the same")
    return scans


def fingerprint(samples: list[tuple[Path, int]], classes: list[str], size: int | None) -> str:
    digest = hashlib.sha256(f"{CACHE_VERSION}\n{classes}\n{size}\n".encode())
    for path, label in samples:
        info = path.stat()
        # the name as bytes: a name that is not UTF-8 cannot be encoded as text (and UTF-8 names hash as before)
        digest.update(os.fsencode(path) + f"\0{label}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def load_folder(root: str | os.PathLike, size: int | None = None, cache: bool = True,
                scanned: tuple[list[str], list[tuple[Path, int]]] | None = None) -> ImageSet:
    """Decode a class-folder split into memory, through a cache beside it.

    Images are stored at `size` (default: the most common shorter side, at most
    256). The cache lives in `<root>/../.cache/<name>.pt` and is used only while
    the file list, sizes and modification times are exactly those it was built from.
    `scanned` is scan_class_folders(root) when the caller has it already.
    """
    root = Path(root)
    classes, samples = scanned or scan_class_folders(root)
    key = fingerprint(samples, classes, size)
    cache_file = root.parent / ".cache" / f"{root.name}.pt"
    if cache and cache_file.is_file():
        try:
            cached = torch.load(cache_file, weights_only=True)
            if cached.get("fingerprint") == key:
                return ImageSet(cached["images"], cached["labels"], cached["classes"], key)
        except Exception:  # a damaged cache is rebuilt, never trusted
            pass
    paths = [p for p, _ in samples]
    images = decode_all(paths, size)
    result = ImageSet(
        torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        torch.tensor([label for _, label in samples], dtype=torch.int64),
        classes,
        key,
    )
    if cache:
        write_cache(cache_file, result, key)
    return result


def decode_all(paths: list[Path], size: int | None) -> np.ndarray:
    """Decode every image at `size`, or at the most common shorter side (at most 256) when None.

    Opens each file once: the size is guessed from a sample, and only if the
    full count disagrees are the images decoded again.
    """
    sample = paths[:: max(1, len(paths) // 64)]
    guess = size or most_common_side([decode(p, 1)[1] for p in sample])
    chunks = [paths[i:i + 1024] for i in range(0, len(paths), 1024)]
    if len(chunks) > 1 and WORKERS > 1:  # decoding is Python-bound: processes, not threads
        with ProcessPoolExecutor(WORKERS) as pool:
            decoded = list(pool.map(decode_chunk, chunks, [guess] * len(chunks)))
    else:
        decoded = [decode_chunk(chunk, guess) for chunk in chunks]
    images = np.concatenate([d[0] for d in decoded])
    sides = [side for d in decoded for side in d[1]]
    if size is None and most_common_side(sides) != guess:
        return decode_all(paths, most_common_side(sides))
    return images


def decode_chunk(paths: list[Path], size: int) -> tuple[np.ndarray, list[int]]:
    decoded = [decode(p, size) for p in paths]
    return np.stack([d[0] for d in decoded]), [d[1] for d in decoded]


def most_common_side(sides: list[int]) -> int:
    return min(collections.Counter(sides).most_common(1)[0][0], MAX_STORED_SIZE)


def write_cache(path: Path, images: ImageSet, key: str) -> None:
    record = {"fingerprint": key, "images": images.images, "labels": images.labels, "classes": images.classes}
    try:
        write_atomically(path, lambda f: torch.save(record, f))
    except OSError as e:  # a read-only or full data folder still trains, only slower to start
        print(f"warning: cannot write the image cache {path} ({e.strerror or e}); decoding every run", file=sys.stderr)


def write_atomically(path: str | os.PathLike, write: Callable[[io.BufferedWriter], object]) -> None:
    """`write` fills a temporary file beside `path`, synced to disk, which then replaces `path`: a failure, a signal
    or a kill mid-write leaves the previous file as it was.

    The temporary file is removed on failure; one left by a killed writer is removed by the next write of `path`
    (one writer per path, as the scripts do). A failed write raises its OSError, also where torch.save wrapped it
    in a RuntimeError (as it does for a full disk).
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
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:  # it may hold gigabytes
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, RuntimeError) and isinstance(e.__context__, OSError):
            raise e.__context__ from None
        raise


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_dataset(data_dir: str | os.PathLike) -> tuple[ImageSet, ImageSet]:
    """The train and test splits of a data folder, with the same classes."""
    data_dir = Path(data_dir)
    scans = scan_dataset(data_dir)  # both splits are checked before the long decoding starts
    train = load_folder(data_dir / "train", scanned=scans["train"])
    return train, load_folder(data_dir / "test", size=train.stored_size, scanned=scans["test"])


def stratified_split(labels: torch.Tensor, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick `count` indices with the class proportions of `labels`; return (picked, rest).

    Per class, floor(count * share) plus one for the largest remainders; the
    choice within a class is a seeded permutation, so it is the same every run.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    per_class = torch.bincount(labels)
    exact = count * per_class.double() / len(labels)
    quota = exact.floor().long()
    remainders = (exact - quota).argsort(descending=True, stable=True)
    quota[remainders[: count - int(quota.sum())]] += 1
    picked, rest = [], []
    for cls in range(len(per_class)):
        members = (labels == cls).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        picked.append(members[: quota[cls]])
        rest.append(members[quota[cls]:])
    return torch.cat(picked).sort().values, torch.cat(rest).sort().values


# --------------------------------------------------------------------------- transforms on the device

def normalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1) * 255
    return (images - mean) / std


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear crop-and-resize of box (x1, y1, x2, y2) of each image to size x size.

    roi_align with aligned=True samples at the same points as torchvision's
    bilinear resize of the crop (identical inside; at the crop's outermost
    half-pixel it reads the neighbouring pixels instead of repeating the edge),
    and averages several samples per output pixel when shrinking.
    """
    index = torch.arange(len(images), device=images.device, dtype=boxes.dtype).unsqueeze(1)
    return roi_align(images.float(), torch.cat([index, boxes], 1), size, 1.0, -1, True)


def random_resized_boxes(n: int, side: int, generator: torch.Generator, device: torch.device,
                         scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts: int = 10) -> torch.Tensor:
    """torchvision's RandomResizedCrop.get_params for a batch of side x side images.

    Each image tries `attempts` (area, aspect) draws and keeps the first that
    fits; if none fits it falls back to the whole (square) image, as torchvision does.
    """
    def uniform(low, high):
        return low + (high - low) * torch.rand(n, attempts, generator=generator, device=device)

    area = side * side * uniform(*scale)
    aspect = torch.exp(uniform(np.log(ratio[0]), np.log(ratio[1])))
    w = torch.sqrt(area * aspect).round()
    h = torch.sqrt(area / aspect).round()
    fits = (w > 0) & (w <= side) & (h > 0) & (h <= side)
    first = fits.long().argmax(1, keepdim=True)
    found = fits.any(1)
    w = torch.where(found, w.gather(1, first).squeeze(1), torch.full_like(found, side, dtype=w.dtype))
    h = torch.where(found, h.gather(1, first).squeeze(1), torch.full_like(found, side, dtype=h.dtype))
    u = torch.rand(n, 2, generator=generator, device=device)
    top = (u[:, 0] * (side - h + 1)).floor()
    left = (u[:, 1] * (side - w + 1)).floor()
    return torch.stack([left, top, left + w, top + h], 1)


def random_shift_boxes(n: int, side: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """side x side crops of the image padded with black by side/8 all round (4 px for CIFAR-10's usual crop)."""
    pad = side // 8
    shift = torch.randint(-pad, pad + 1, (n, 2), generator=generator, device=device).float()
    return torch.cat([shift, shift + side], 1)


# --augment: the reference's RandomResizedCrop, or the usual CIFAR-10 padded crop; each then resized and flipped
AUGMENTATIONS = {"rrc": random_resized_boxes, "crop": random_shift_boxes}


def train_batch(images: torch.Tensor, size: int, generator: torch.Generator, part: slice = slice(None),
                augmentation: str = "rrc", cutout: float = 0.0) -> torch.Tensor:
    """A crop (see AUGMENTATIONS) resized to size, a horizontal flip, normalisation, then cutout: on images' device.

    Cutout (DeVries & Taylor, 2017) sets a square of side `cutout` x size, centred
    anywhere in the image and clipped at its edges, to the mean colour (0 after
    normalisation). The random draws are made for the whole batch and `part` of
    it is returned, so processes that share a global batch augment it as one process would.
    """
    boxes = AUGMENTATIONS[augmentation](len(images), images.shape[-1], generator, images.device)[part]
    flip = (torch.rand(len(images), generator=generator, device=images.device) < 0.5)[part]
    x = crop_resize(images[part], boxes, size)
    x = normalize(torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x))
    if cutout:
        side = round(cutout * size)
        start = torch.randint(size, (len(images), 2), generator=generator, device=images.device)[part] - side // 2
        pixel = torch.arange(size, device=images.device)
        inside = (pixel >= start[:, :, None]) & (pixel < start[:, :, None] + side)  # N x (rows, columns) x size
        x = x.masked_fill((inside[:, 0, :, None] & inside[:, 1, None, :])[:, None], 0.0)
    return x


def eval_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize to 256/224 of `size`, centre-crop `size`, normalise: one crop box per image."""
    side = images.shape[-1]
    resized = int(size * EVAL_RESIZE)
    offset = int(round((resized - size) / 2.0))
    box = torch.tensor([offset, offset, offset + size, offset + size], dtype=torch.float32, device=images.device)
    return normalize(crop_resize(images, (box * side / resized).expand(len(images), 4), size))


# --------------------------------------------------------------------------- download

class Lock:
    """An exclusive lock on the file `path`, which names its holder's pid; the holder's end, even by SIGKILL, frees it.

    `taken(pid)` makes the error raised while another process holds it.
    """

    def __init__(self, path: Path, taken: Callable[[str], Exception]) -> None:
        self.path = path
        while True:
            self.file = open(path, "a+")
            try:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.file.seek(0)
                owner = self.file.read().strip() or "unknown"
                self.file.close()
                raise taken(owner) from None
            if self.locks_path():
                break
            # The file was opened just before its holder removed it: locking it excludes no one, since the next
            # process creates and locks a new file at `path`. Lock what is at `path` now.
            self.file.close()
        self.file.truncate(0)
        self.file.write(str(os.getpid()))
        self.file.flush()

    def locks_path(self) -> bool:
        """Whether the file locked is the one `path` names."""
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return False
        locked = os.fstat(self.file.fileno())
        return (locked.st_dev, locked.st_ino) == (now.st_dev, now.st_ino)

    def __enter__(self) -> "Lock":
        return self

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)  # while still locked: no other process can be holding it
        self.file.close()


def download(root: str | os.PathLike, source: str | None = None, md5: str | None = None) -> Path:
    """Make ROOT/train/<class>/ and ROOT/test/<class>/ from the official CIFAR-10 or another source.

    Everything happens in a temporary folder beside ROOT, which is renamed into
    place only once complete, so a failure or an interruption leaves nothing behind.
    A lock beside ROOT lets one download at a time work there: a temporary folder
    found by the lock's holder was left by a killed download, and is removed.
    """
    root = Path(root)
    for path in (root, *root.parents):
        if path.exists() and not path.is_dir():
            raise DataError(f"--root {root}: {'it' if path == root else path} is a file, not a folder",
                            "choose another --root")
    source, md5 = checked_source(source, md5)
    if dataset_problem(root) is not None or partial_folders(root):  # a complete ROOT needs no lock: it may be read-only
        with download_lock(root):
            remove_partial_folders(root)  # a killed download's: they may hold gigabytes
            try:
                problem = dataset_problem(root)
                if problem is not None:
                    return make_root(root, source, md5, problem)
            finally:
                remove_partial_folders(root)  # this one's, also when a signal came as mkdtemp returned
    print(f"{root} already holds train/ and test/; nothing to do")
    return root


def is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in ("http", "https", "ftp")


def checked_source(source: str | None, md5: str | None) -> tuple[str, str | None]:
    """The official tarball and its md5 by default; an md5 in lower case, as check_integrity computes it."""
    if source is None:
        return CIFAR10_URL, CIFAR10_MD5
    if not is_url(source):
        if not Path(source).exists():
            raise DataError(f"--source {source}: no such file or folder", "pass a URL, an archive or a folder")
        if md5 is not None and Path(source).is_dir():
            raise DataError(f"--md5 {md5}: --source {source} is a folder, which has no checksum",
                            "drop --md5, or pass an archive")
    return source, None if md5 is None else md5.lower()


def dataset_problem(root: Path) -> str | None:
    """What keeps ROOT from being a complete data set (see scan_dataset), or None; ROOT named by its last part."""
    try:
        scan_dataset(root, root.name)
    except DataError as e:
        return e.problem
    return None


def partial_folders(root: Path) -> list[Path]:
    """The temporary folders of downloads into ROOT (see download)."""
    prefix = f".{root.name}.partial-"
    return [p for p in root.parent.iterdir() if p.name.startswith(prefix)] if root.parent.is_dir() else []


def remove_partial_folders(root: Path) -> None:
    """Under the download lock only: then every temporary folder of ROOT is its holder's or a killed download's."""
    for folder in partial_folders(root):
        shutil.rmtree(folder, ignore_errors=True)


def download_lock(root: Path) -> Lock:
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        return Lock(root.parent / f".{root.name}.lock", lambda owner: DataError(
            f"--root {root}: another download (pid {owner}) is writing it",
            "wait for it to end or choose another --root"))
    except OSError as e:
        raise DataError(f"--root {root}: cannot write in {root.parent} ({e.strerror or e})",
                        "choose another --root") from None


def make_root(root: Path, source: str, md5: str | None, problem: str) -> Path:
    """Build the data set in a temporary folder beside ROOT (the caller removes it), then rename it into place."""
    if root.is_dir() and any(root.iterdir()):
        if (root / "train").exists() or (root / "test").exists():
            raise DataError(f"--root {root}: an incomplete data set ({problem})",
                            "remove it and run again, or choose another --root")
        raise DataError(f"--root {root}: exists but holds no train/ and test/ folders",
                        "remove it or choose another --root")
    work = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.partial-"))
    scans = build_tree(source, md5, work, root)
    if root.exists():
        root.rmdir()  # empty, checked above
    os.replace(work / "tree", root)
    classes, train = scans["train"]
    print(f"{root}: {len(train)} training and {len(scans['test'][1])} test images in {len(classes)} classes")
    return root


def build_tree(source: str, md5: str | None, work: Path,
               root: Path) -> dict[str, tuple[list[str], list[tuple[Path, int]]]]:
    """WORK/tree/train/ and test/ from a URL, an archive or a folder; returns their scan_dataset. WORK is in ROOT's
    parent: ROOT names it in messages."""
    tree = work / "tree"
    local = fetch(source, work) if is_url(source) else Path(source)
    if local.is_dir():
        copy_class_folders(local, tree, source)
    else:
        if md5 is None:  # a folder has no checksum, and is not warned about
            print(f"warning: {source} is not checked against a checksum; pass --md5 to check it", file=sys.stderr)
        elif not check_integrity(str(local), md5):
            raise DataError(f"{source}: checksum mismatch (expected md5 {md5}); the file is corrupt or not the one "
                            "expected: download it again or pass the right --md5")
        unpack(local, work, root, source)
    try:
        return scan_dataset(tree, source)
    except DataError as e:
        raise DataError(e.problem, "fix the source") from None


def fetch(url: str, work: Path) -> Path:
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    try:
        download_url(url, str(work), name)
    except (urllib.error.URLError, HTTPException, OSError) as e:
        raise DataError(f"{url}: download failed ({getattr(e, 'reason', e)}); check the network or pass --source "
                        "a local copy") from None
    return work / name


def unpack(archive: Path, work: Path, root: Path, source: str) -> None:
    """The official python tarball, or a .tar(.gz)/.zip of train/ and test/ class folders, into WORK/tree.

    `source` names the archive in messages: the --source the user gave.
    """
    tree = work / "tree"
    damaged = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, OSError)
    try:
        if tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tar:
                members = tar.getmembers()
                check_unpacked_size(source, sum(m.size for m in members if m.isreg()), work)
                if f"{CIFAR10_DIR}/data_batch_1" in tar.getnames():
                    convert_cifar10(tar, tree, source)
                    return
                check_members(source, [tar_member(m) for m in members])
                tar.extractall(work / "extract", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
                while tar.fileobj.read(2**20):  # to the stream's end, where gzip and xz check it: damage that
                    pass  # decompressed into what looked like the archive's end shows only there
        elif zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                members = zf.infolist()
                check_unpacked_size(source, sum(m.file_size for m in members), work)
                check_members(source, [(m.filename, None, None) for m in members])  # zipfile writes only files
                zf.extractall(work / "extract")
        else:
            raise DataError(f"{source}: not a tar or zip archive, or an incomplete one; download it again, or pass "
                            "the CIFAR-10 python tarball or an archive or folder of train/ and test/ class folders")
    except damaged as e:
        raise unpack_error(e, work, root, source) from None
    copy_class_folders(work / "extract", tree, source, move=True)


def unpack_error(e: Exception, work: Path, root: Path, source: str) -> DataError:
    """What went wrong unpacking into WORK: the archive (a damaged compressed stream is an OSError without errno), or
    --root when a write failed for want of room or permission."""
    if isinstance(e, OSError) and (e.errno in WRITE_ERRNOS or names_a_file_in(e, work)):
        return DataError(f"--root {root}: cannot write ({e.strerror or e})", "free space or choose another --root")
    return DataError(f"{source}: damaged or incomplete archive ({e})", "download it again")


def names_a_file_in(e: OSError, folder: Path) -> bool:
    """Whether `e` is about a file inside FOLDER (one about the archive names the archive, or no file)."""
    return e.filename is not None and Path(os.path.abspath(os.fsdecode(e.filename))).is_relative_to(folder.absolute())


def size_text(size: int) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def check_unpacked_size(source: str, size: int, work: Path) -> None:
    """Refuse an archive whose members declare more bytes than the limit or the free space where it unpacks.

    The declared sizes bound what unpacking writes: tarfile and zipfile stop a
    member there (and zipfile then fails its checksum).
    """
    if size > MAX_UNPACKED_BYTES:
        raise DataError(f"{source}: would unpack to {size_text(size)}, more than the {size_text(MAX_UNPACKED_BYTES)} "
                        "this script unpacks (a zip bomb?)", "if it is a data set, unpack it yourself and pass "
                        "the folder as --source")
    free = shutil.disk_usage(work).free
    if size > free:
        raise DataError(f"{source}: would unpack to {size_text(size)}, more than the {size_text(free)} free at "
                        f"{work.parent}", "free space there or choose a --root on another disk")


def tar_member(member: tarfile.TarInfo) -> tuple[str, str | None, str | None]:
    """(name, link target, what it is unless a file, folder or link) for check_members."""
    link = member.linkname if member.issym() or member.islnk() else None
    plain = member.isreg() or member.isdir() or link is not None
    mode = {tarfile.CHRTYPE: stat.S_IFCHR, tarfile.BLKTYPE: stat.S_IFBLK, tarfile.FIFOTYPE: stat.S_IFIFO}
    return member.name, link, None if plain else special_kind(mode.get(member.type, 0))


MEMBER_ADVICE = "use the official archive or an archive or folder of class folders"


def check_members(source: str, members: list[tuple[str, str | None, str | None]]) -> None:
    """Refuse devices and FIFOs (no part of a data set), absolute names, `..`, and links that point outside."""
    for name, link, special in members:
        if special is not None:
            raise DataError(f"{source}: member {name!r} is {special}, not a regular file or folder; refusing to unpack "
                            "it", MEMBER_ADVICE)
        for path in (name, None if link is None else os.path.join(os.path.dirname(name), link)):
            if path is None:
                continue
            normal = os.path.normpath(path.replace("\\", "/"))
            if os.path.isabs(path) or path.startswith(("/", "\\")) or normal == ".." or normal.startswith("../"):
                raise DataError(f"{source}: member {name!r} points outside the archive; refusing to unpack it",
                                MEMBER_ADVICE)


def copy_class_folders(folder: Path, tree: Path, source: str, move: bool = False) -> None:
    """Find the folder holding train/ and test/ (it may be nested, e.g. cifar10/) and bring it to `tree`.

    `source` names the --source in messages.
    """
    one_down = sorted(p for p in folder.glob("*") if p.is_dir())
    two_down = sorted(p for p in folder.glob("*/*") if p.is_dir())
    for found in [folder] + one_down + two_down:
        if (found / "train").is_dir() and (found / "test").is_dir():
            tree.mkdir()
            for split in ("train", "test"):
                if move:
                    shutil.move(found / split, tree / split)
                else:
                    copy_following_links(found / split, tree / split, source)
            return
    raise DataError(f"{source}: no train/ and test/ class folders found (looked two levels down); "
                    "lay it out as train/<class>/<image> and test/<class>/<image>")


def copy_following_links(folder: Path, target: Path, source: str) -> None:
    """Copy a folder; a linked image or class folder is copied as what it points to (a copied link could break).

    A link that leads back to a folder above it is refused first: the copy would follow it round and round,
    40 levels deep, and fail with kilobytes of messages.
    """
    refuse_link_loops(folder, source, [])
    try:
        shutil.copytree(folder, target, copy_function=functools.partial(copy_file, source=source))
    except shutil.Error as e:  # a folder that could not be made, one (folder, copy, why) each: the first says enough
        name, _, why = e.args[0][0]
        raise DataError(f"--source {source}: cannot copy {shown(name)} ({why})",
                        "free space or choose another --root") from None
    except OSError as e:  # the copy's first folder could not be made
        raise DataError(f"--source {source}: cannot copy {shown(folder)} ({e.strerror or e})",
                        "free space or choose another --root") from None


# A write that failed for these is the fault of where it writes (--root), not of what it copies or unpacks.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def copy_file(src: str, dst: str, source: str) -> str:
    """copytree's copy_function: the first file that fails ends the copy, as a DataError naming it.

    copytree would note the error and copy on: for hours, file after file, on a full disk.
    """
    try:
        return shutil.copy2(src, dst)
    except OSError as e:
        at_root = e.errno in WRITE_ERRNOS or e.filename == dst  # dst could not be made
        raise DataError(f"--source {source}: cannot copy {shown(src)} ({e.strerror or e})",
                        "free space or choose another --root" if at_root else "fix or remove it") from None


def refuse_link_loops(folder: Path, source: str, above: list[tuple[tuple[int, int], Path]]) -> None:
    """Walk `folder` as copytree will, following links, refusing what it would fail on or never finish.

    That is a link loop (`above` holds the (device, inode) of each folder above), a link that cannot be followed,
    and what is neither a file nor a folder: copytree reads a device (say a link to /dev/zero) forever.
    """
    info = folder.stat()
    above = above + [((info.st_dev, info.st_ino), folder)]
    with os.scandir(folder) as entries:  # closed also when a loop is refused
        entries = list(entries)
    for entry in entries:
        try:
            target = entry.stat()  # following links, as copytree does
        except OSError as e:  # a link to itself, to a link back to it, or to nothing (or a file gone meanwhile)
            what = "is a link that cannot be followed" if entry.is_symlink() else "cannot be read"
            raise DataError(f"--source {source}: {shown(entry.path)} {what} ({e.strerror})",
                            "remove it or make it point to a file or folder") from None
        if stat.S_ISDIR(target.st_mode):
            back = [path for key, path in above if key == (target.st_dev, target.st_ino)]
            if back:
                raise DataError(f"--source {source}: {shown(entry.path)} is a link back to {shown(back[0])}, "
                                "a loop", "remove it")
            refuse_link_loops(Path(entry.path), source, above)
        elif not stat.S_ISREG(target.st_mode):
            through = " (through a link)" if entry.is_symlink() else ""
            raise DataError(f"--source {source}: {shown(entry.path)} is {special_kind(target.st_mode)}{through}, "
                            "not a regular file or folder", "remove it")


class CifarUnpickler(pickle.Unpickler):
    """The official batches are pickles; allow only what numpy arrays need, never other code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def convert_cifar10(tar: tarfile.TarFile, tree: Path, source: str) -> None:
    """Write the official arrays as PNG: TREE/<split>/<class>/NNNN.png, NNNN = index within the class.

    Class names and labels are checked before anything is written: they become paths.
    """
    classes = cifar_classes(read_cifar_batch(tar, "batches.meta", source), source)
    splits = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    with ThreadPoolExecutor(WORKERS) as pool:
        for split, batches in splits.items():
            counts = [0] * len(classes)
            for name in classes:
                (tree / split / name).mkdir(parents=True)
            jobs = []
            for batch_name in batches:
                pixels, labels = cifar_arrays(read_cifar_batch(tar, batch_name, source), batch_name, len(classes),
                                              source)
                for image, label in zip(pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels):
                    path = tree / split / classes[label] / f"{counts[label]:04d}.png"
                    counts[label] += 1
                    jobs.append(pool.submit(Image.fromarray(image).save, path))
            for job in jobs:
                job.result()


def read_cifar_batch(tar: tarfile.TarFile, name: str, source: str) -> object:
    """One pickle of the official tarball, unpickled by CifarUnpickler."""
    try:
        return CifarUnpickler(io.BytesIO(tar.extractfile(f"{CIFAR10_DIR}/{name}").read()), encoding="latin1").load()
    except (KeyError, AttributeError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"{source}: {CIFAR10_DIR}/{name} is missing or damaged ({e}); "
                        "download the tarball again") from None


def not_official(source: str, name: str, what: str) -> DataError:
    return DataError(f"{source}: {CIFAR10_DIR}/{name} is not the official format ({what})", "download it again")


def cifar_classes(meta: object, source: str) -> list[str]:
    """batches.meta's label_names, which become folder names: unique plain names, none hidden (ImageFolder skips
    those), none naming another folder (`..`, `/`) or unwritable (NUL, over 255 bytes)."""
    names = meta.get("label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise not_official(source, "batches.meta", "no list of label_names")
    for name in names:
        if not name or name.startswith(".") or "/" in name or "\0" in name or len(name.encode()) > 255:
            raise not_official(source, "batches.meta", f"label name {name!r} cannot be a folder name")
    if len(set(names)) != len(names):
        raise not_official(source, "batches.meta", "label names repeat")
    return names


def cifar_arrays(batch: object, name: str, class_count: int, source: str) -> tuple[np.ndarray, list[int]]:
    """A batch's data (N x 3072 uint8) and labels (N integers, each a class)."""
    pixels = batch.get("data") if isinstance(batch, dict) else None
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != 3072:
        raise not_official(source, name, "data is not N x 3072 uint8")
    labels = batch.get("labels")
    if not isinstance(labels, list) or len(labels) != len(pixels) or not all(isinstance(i, int) for i in labels):
        raise not_official(source, name, f"labels are not a list of {len(pixels)} integers")
    if labels and not (min(labels) >= 0 and max(labels) < class_count):
        raise not_official(source, name, f"a label outside 0-{class_count - 1}")
    return pixels, labels


def md5_digits(text: str) -> str:
    """--md5: 32 hexadecimal digits, in either case (checked_source lower-cases them, also for callers of download)."""
    if len(text) != 32 or not all(c in "0123456789abcdefABCDEF" for c in text):
        raise argparse.ArgumentTypeError(f"must be 32 hexadecimal digits (an md5 checksum), got {text!r}")
    return text


def path_text(text: str) -> str:
    """--root, --source: an empty string would quietly mean the current folder."""
    if not text:
        raise argparse.ArgumentTypeError("is empty; pass a path")
    return text


def main(argv: list[str] | None = None) -> None:
    # allow_abbrev=False: an abbreviated flag is an error, not taken for another flag (as in the other scripts)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
                                     allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    get = commands.add_parser("download", help="download CIFAR-10 (or unpack a local copy) into class folders",
                              formatter_class=HelpFormatter, allow_abbrev=False)
    get.add_argument("--root", type=path_text, default="data/cifar10",
                     help="folder to create, holding train/ and test/")
    get.add_argument("--source", type=path_text, default=None,
                     help="URL, tarball, .tar.gz/.zip of class folders, or a folder "
                     "(default: the official cifar-10-python.tar.gz, md5-checked)")
    get.add_argument("--md5", type=md5_digits, default=None,
                     help="expected md5 of a --source file (default: not checked)")
    args = parser.parse_args(argv)
    try:
        download(args.root, args.source, args.md5)
    except DataError as e:
        sys.exit(f"data.py: {e}")
    except KeyboardInterrupt:  # the temporary folder is already gone
        sys.exit(f"data.py: interrupted; nothing was written to {args.root}")


if __name__ == "__main__":
    main()
