"""Class-folder data sets: images -> class folders -> a uint8 cache -> batches on the device.

A data set is a folder with `train/` and `test/`, each holding one folder per
class (torchvision ImageFolder conventions: class folders sorted by name,
hidden files and non-images ignored). Each split is decoded once into a uint8
tensor N x 3 x S x S, cached in `<data-dir>/.cache/` and rebuilt whenever the
files change. Augmentation and the evaluation transform run batched on
whatever device holds that tensor. download.py gets a data set onto disk.

Sections: files (what every script shares: DataError, write_atomically, Lock,
stop_signals, stdout and stderr as Output, the --help formatter); images; class folders and the cache;
transforms on the device.
"""
import argparse
import collections
import errno
import fcntl
import hashlib
import io
import os
import re
import signal
import stat
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.ops import roi_align

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MEAN = (0.485, 0.456, 0.406)  # ImageNet normalisation, as the reference
STD = (0.229, 0.224, 0.225)
EVAL_RESIZE = 256 / 224  # evaluation resizes to 256/224 of the crop, then centre-crops
MAX_STORED_SIZE = 256  # larger photos are stored at 256 px, enough for 224 crops
MAX_ASPECT_RATIO = 100  # an image's longer side at most this many times its shorter one
CACHE_VERSION = 1
URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:/")  # "//" may have become "/" in a Path
WORKERS = min(8, len(os.sched_getaffinity(0)))


# --------------------------------------------------------------------------- files (every script's)

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


def write_atomically(path: str | os.PathLike, write: Callable[[io.BufferedWriter], object]) -> None:
    """`write` fills a temporary file beside `path`, synced to disk, which then replaces `path`: a failure, a signal
    or a kill mid-write leaves the previous file as it was.

    The temporary file, named with the writer's pid, is removed on failure; one left by a killed writer (its pid
    gone) is removed by the next write of `path`. Writers of one path at once (two predict.py --grid, two runs
    building one cache) each write their own, the last rename wins, and none removes another's. A failed write
    raises its OSError, also where torch.save wrapped it in a RuntimeError (as it does for a full disk).
    """
    directory, name = os.path.split(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        remove_dead_writers_files(directory, name)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.{os.getpid()}-", suffix=".tmp")
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


def remove_dead_writers_files(directory: str, name: str) -> None:
    """The temporary files of `name` (see write_atomically) whose writer is no longer running: they may be large."""
    own = re.compile(rf"\.{re.escape(name)}\.(\d+)-\w+\.tmp")
    for entry in os.scandir(directory):
        match = own.fullmatch(entry.name)
        if match and not process_is_running(int(match[1])):
            Path(entry.path).unlink(missing_ok=True)


def process_is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only whether there is such a process
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


def stop_signals() -> list[signal.Signals]:
    """The signals that stop a script cleanly: SIGINT, SIGTERM and SIGHUP (a terminal closed, an ssh connection
    dropped), but not SIGHUP where it is ignored (`nohup`): the user asked the run to outlive the terminal."""
    return [sig for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
            if sig != signal.SIGHUP or signal.getsignal(sig) != signal.SIG_IGN]


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class Lock:
    """An exclusive lock on the file `path`, which names its holder's pid; the holder's end, even by SIGKILL, frees it.

    `taken(pid)` makes the error raised while another process holds it; an OSError is raised when the lock file
    cannot be written (a full disk).
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
        try:
            self.file.truncate(0)
            self.file.write(str(os.getpid()))
            self.file.flush()
        except OSError:  # a full disk: no lock file is left behind, the caller words the error
            self.__exit__()
            raise

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


class Output:
    """sys.stdout or sys.stderr, for which a closed pipe, a hang-up (EIO) or a full disk is an ordinary event.

    The first write or flush that fails is kept in `lost`, and the stream's file descriptor then points at
    /dev/null, so that nothing written later fails again (Python's own flush at exit included): the program goes
    on, and decides what the loss means (see guard_output's callers).
    """

    def __init__(self, stream, whole: bool = False) -> None:
        """`whole`: what is written to a regular file is all or nothing, the file cut back to its start on a loss."""
        self.stream = stream
        self.lost: OSError | None = None
        self.lost_told = False  # whether the program has said so
        self.start = regular_file_offset(stream) if whole else None

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError as e:
            self.lose(e)
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as e:
            self.lose(e)

    def lose(self, error: OSError) -> None:
        self.lost = self.lost or error
        try:
            if self.start is not None:  # back to the start too: `2>&1` shares the offset, no hole before stderr's
                os.ftruncate(self.stream.fileno(), self.start)
                os.lseek(self.stream.fileno(), self.start, os.SEEK_SET)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, io.UnsupportedOperation):  # no file descriptor (a test's StringIO)
            pass

    def isatty(self) -> bool:
        return self.lost is None and self.stream.isatty()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def regular_file_offset(stream) -> int | None:
    """Where writing to `stream` starts when it is a regular file (`> file` or `>> file`), else None."""
    try:
        fd = stream.fileno()
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.fstat(fd).st_size if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND else os.lseek(fd, 0, os.SEEK_CUR)
    except (OSError, ValueError, io.UnsupportedOperation):
        return None


def guard_output(whole: bool = False) -> None:
    """sys.stdout and sys.stderr as Output (stdout `whole` or not): a script's output never ends it with a traceback."""
    if not isinstance(sys.stdout, Output):
        sys.stdout = Output(sys.stdout, whole) if sys.stdout is not None else closed_output()
    if not isinstance(sys.stderr, Output):
        sys.stderr = Output(sys.stderr) if sys.stderr is not None else closed_output()


def closed_output() -> Output:
    """For a stream Python found closed at the start (`>&-`): it is None then, and lost from the start."""
    output = Output(open(os.devnull, "w"))
    output.lost = OSError(errno.EBADF, os.strerror(errno.EBADF))
    return output


def shown(path: str | os.PathLike) -> str:
    """A path as text any stream prints: bytes of a name that are not UTF-8 (made on another system) as \\xNN,
    control characters escaped (see printable)."""
    return printable(os.fsencode(path).decode("utf-8", "backslashreplace"))


# Control characters as Python writes them in a string literal: a newline or tab in a name would split a line of
# output (predict's tab-separated lines, a report's rows), an escape sequence would drive the terminal.
ESCAPES = {code: f"\\x{code:02x}" for code in (*range(32), 127)} | {9: "\\t", 10: "\\n", 13: "\\r"}


def printable(text: str) -> str:
    return text.translate(ESCAPES)


def special_kind(mode: int) -> str:
    """What a file that is no regular file, folder or link is, from its st_mode."""
    kinds = {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFIFO: "a FIFO",
             stat.S_IFSOCK: "a socket"}
    return kinds.get(stat.S_IFMT(mode), "a special file")


# --------------------------------------------------------------------------- images

def load_image(path: str | os.PathLike, size: int | None = None) -> tuple[Image.Image, int]:
    """Any image Pillow reads, as RGB, upright (EXIF), transparency over white.

    Returns the image and its original shorter side. `size` lets a JPEG decode
    at a reduced scale that is still at least size x size.
    """
    with Image.open(path) as img:
        shorter_side = min(img.size)
        if max(img.size) > MAX_ASPECT_RATIO * shorter_side:  # its resize to `size` px across could fill the memory
            raise DataError(f"{shown(path)}: {img.size[0]} x {img.size[1]} px, its longer side over {MAX_ASPECT_RATIO} "
                            "times its shorter: too narrow to take a square from", "crop it, or remove the file")
        if size is not None and img.format == "JPEG":
            img.draft("RGB", (size, size))
        img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I") or img.mode == "F":  # 16/32-bit grey: scale, do not clip
        img = Image.fromarray(grey_to_8_bits(np.asarray(img, dtype=np.float64), img.mode), "L")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), shorter_side
    return img.convert("RGB"), shorter_side


def grey_to_8_bits(pixels: np.ndarray, mode: str) -> np.ndarray:
    """16-bit and 32-bit integer grey by 65535 / 255; 32-bit float by its range: 0 ... 1 (the usual one), else as
    integers are; NaN as black."""
    pixels = np.where(np.isnan(pixels), 0.0, pixels)
    if mode == "F" and pixels.size and pixels.max() <= 1.0:
        pixels = pixels * 255.0
    elif mode.startswith("I;16") or pixels.max(initial=0) > 255:
        pixels = pixels / 257.0
    return np.clip(pixels, 0, 255).astype(np.uint8)


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


def is_image_file(path: Path) -> bool:
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def image_files(folder: Path, above: frozenset[Path] | None = None) -> list[Path]:
    """The image files anywhere under `folder`, sorted; links to folders are followed (as ImageFolder does), except
    a link to a folder it lies in (a loop). `above`: the real paths of the folders it lies in (default: all).
    A walk, not a recursion: a tree may be deeper than Python's recursion limit."""
    files, walk = [], [(folder, frozenset(folder.resolve().parents) if above is None else above)]
    while walk:
        current, outer = walk.pop()
        real = current.resolve()
        if real in outer:
            continue
        try:
            entries = list(current.iterdir())
        except OSError as e:
            raise DataError(f"{shown(current)}: cannot read this folder ({e.strerror or e})",
                            "check its permissions or remove it") from None
        files += [p for p in entries if is_image_file(p) and p.is_file()]
        walk += [(p, outer | {real}) for p in entries if p.is_dir()]
    return sorted(files)


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
        raise DataError(f"{name}: no such folder", "download the data (python download.py) or pass --data-dir")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{name}: no class folders inside", f"expected {name}/<class>/<image> files")
    samples = []
    above = frozenset([root.resolve(), *root.resolve().parents])  # a class folder linked to one: a loop
    for label, folder in enumerate(classes):
        files = image_files(root / folder, above)
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
    if URL.match(str(data_dir)) and not data_dir.exists():
        raise DataError(f"{name}: a URL, not a folder", "download it first: python download.py --source URL "
                        "--root FOLDER, then pass --data-dir FOLDER")
    for split in ("train", "test"):
        if not (data_dir / split).is_dir():
            raise DataError(f"{name}: no {split}/ folder", "a data folder holds train/<class>/ and test/<class>/ "
                            "(python download.py makes one for CIFAR-10)")
    scans = {split: scan_class_folders(data_dir / split, f"{name}/{split}") for split in ("train", "test")}
    train, test = scans["train"][0], scans["test"][0]
    if train != test:
        only_train, only_test = sorted(set(train) - set(test)), sorted(set(test) - set(train))
        raise DataError(f"{name}: train/ and test/ have different class folders "
                        f"(only in train: {only_train or 'none'}, only in test: {only_test or 'none'})",
                        "make them the same")
    return scans


def fingerprint(samples: list[tuple[Path, int]], classes: list[str], size: int | None, root: Path) -> str:
    """Of the files under `root` (names relative to it: the same folder named relatively or absolutely, or moved,
    has the same fingerprint), their sizes and modification times."""
    digest = hashlib.sha256(f"{CACHE_VERSION}\n{classes}\n{size}\n".encode())
    for path, label in samples:
        info = path.stat()
        # the name as bytes: a name that is not UTF-8 cannot be encoded as text
        digest.update(os.fsencode(path.relative_to(root)) + f"\0{label}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
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
    key = fingerprint(samples, classes, size, root)
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
