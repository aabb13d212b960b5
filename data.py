"""Class-folder data sets: images -> class folders -> a uint8 cache -> batches -> transforms on the device.

A data set is a folder with `train/` and `test/`, each holding one folder per class as ImageFolder reads them
(download.py gets one); each split is decoded once into a uint8 file N x 3 x S x S, cached (see load_folder).
"""
import contextlib
import functools
import hashlib
import json
import math
import multiprocessing.connection  # binds multiprocessing too
import os
import re
import signal
import sys
import tempfile
import threading
import unicodedata
import warnings
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

import cli

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
PLUGIN_TYPES = (".heic", ".heif", ".avif")  # phones' photos, which Pillow reads only with a plugin (pillow-heif)
MEAN = (0.485, 0.456, 0.406)  # ImageNet normalisation, as the reference
STD = (0.229, 0.224, 0.225)
EVAL_RESIZE = 256 / 224  # evaluation resizes to 256/224 of the crop, then centre-crops
MAX_STORED_SIZE = 256  # larger photos are stored at 256 px, enough for 224 crops
MAX_ASPECT_RATIO = 100  # an image's longer side at most this many times its shorter one
CACHE_VERSION = 1  # in the fingerprint a resumed run compares: raised, no run from before resumes
# How a split's side is chosen without --stored-size (typical_side); in the cache's key, not in the fingerprint: a cache
# an older rule built is built again, and runs from before still resume (pretrain.py refuses one at another size)
SIDE_RULE = "median"
URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:/")  # "//" may have become "/" in a Path; one letter is a drive (C:/)
# the CPUs this process may use (macOS and Windows have no affinity: all of them)
WORKERS = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
CHUNK = 2**24  # bytes of a cache hashed, or written as zeros where there is no posix_fallocate, at a time
DECODE_CHUNK = 256  # images per task of a decoding process: its share of the file is written, then synced
WATCH_INTERVAL = 0.2  # seconds between a decoding process's looks at its parent
PREFETCH = 2  # streamed batches gathered ahead of the one in use


# --------------------------------------------------------------------------- images

def grey_to_8_bits(pixels: np.ndarray, mode: str) -> np.ndarray:
    """Grey to 8 bits: 16-bit (I;16) or any over 255 by 65535 / 255, float within 0 ... 1 by 255; NaN as black."""
    pixels = np.where(np.isnan(pixels), 0.0, pixels)
    if mode == "F" and pixels.size and pixels.max() <= 1.0:
        pixels = pixels * 255.0
    elif mode.startswith("I;16") or pixels.max(initial=0) > 255:
        pixels = pixels / 257.0
    return np.clip(pixels, 0, 255).astype(np.uint8)


def decode(path: str | os.PathLike, size: int) -> tuple[np.ndarray, int]:
    """Any image Pillow reads as a size x size x 3 uint8 RGB array (upright by EXIF, transparency over white, shorter
    side to `size`, centre-cropped) and its original shorter side: the cache's and predict.py's images alike."""
    try:
        with warnings.catch_warnings(record=True) as caught:  # Pillow's own warning would not name the file
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                shorter_side = min(img.size)
                if max(img.size) > MAX_ASPECT_RATIO * shorter_side:  # resized to `size` across, it could fill memory
                    raise cli.DataError(f"{cli.shown(path)}: {img.size[0]} x {img.size[1]} px, its longer side over "
                                        f"{MAX_ASPECT_RATIO} times its shorter: too narrow to take a square from",
                                        "crop it, or remove the file")
                if img.format == "JPEG":
                    img.draft("RGB", (size, size))
                img = ImageOps.exif_transpose(img)
            if img.mode.startswith("I") or img.mode == "F":  # 16/32-bit grey: scale, do not clip
                img = Image.fromarray(grey_to_8_bits(np.asarray(img, dtype=np.float64), img.mode), "L")
            if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
            img = img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        plugin = isinstance(e, Image.UnidentifiedImageError) and Path(path).suffix.lower() in PLUGIN_TYPES
        advice = ("convert it to .jpg or .png (Pillow reads HEIC and AVIF only with a plugin)" if plugin else
                  "remove or replace the file")
        raise cli.DataError(f"{cli.shown(path)}: cannot read this image ({e}); {advice}") from None
    for warning in caught:
        print(f"warning: {cli.shown(path)}: {warning.message}", file=sys.stderr)
    if img.size != (size, size):
        scale = size / min(img.size)
        w, h = (max(size, round(side * scale)) for side in img.size)
        img = img.resize((w, h), Image.BILINEAR)  # Pillow antialiases when shrinking
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return np.array(img, dtype=np.uint8), shorter_side


def image_files(folder: Path, above: frozenset[Path] | None = None) -> tuple[list[Path], list[Path]]:
    """The image files anywhere under `folder`, sorted; links to folders are followed (as ImageFolder does), except
    a link to a folder it lies in (a loop). `above`: the real paths of the folders it lies in (default: all).
    And the files of the types Pillow reads that IMAGE_EXTENSIONS leaves out (see other_image_types), for the caller
    to say (warn_left_out). A walk, not a recursion: a tree may be deeper than Python's recursion limit."""
    files, left_out, walk = [], [], [(folder, frozenset(folder.resolve().parents) if above is None else above)]
    while walk:
        current, outer = walk.pop()
        real = current.resolve()
        if real in outer:
            continue
        entries = [p for p in folder_entries(current) if not p.name.startswith(".")]
        files += [p for p in entries if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
        left_out += [p for p in entries if p.suffix.lower() in other_image_types() and p.is_file()]
        walk += [(p, outer | {real}) for p in entries if p.is_dir()]
    return sorted(files), left_out


@functools.cache
def other_image_types() -> frozenset[str]:
    """Endings of images Pillow reads that ImageFolder's conventions (IMAGE_EXTENSIONS) skip: .gif, .jfif, .jpe, ...;
    not its stubs' (.h5, .grib, .wmf: data it cannot decode), nor video's (.mpg). And phones' photos, which Pillow
    reads only with a plugin (HEIC, an iPhone's; AVIF before Pillow 11.3): a class of them would go without a word."""
    ends = Image.registered_extensions()  # fills Image.OPEN too
    return frozenset(end for end, kind in ends.items() if kind in Image.OPEN and kind != "MPEG" and not (
        isinstance(opener := Image.OPEN[kind][0], type) and issubclass(opener, ImageFile.StubImageFile))).union(
        PLUGIN_TYPES) - set(IMAGE_EXTENSIONS)


def warn_left_out(name: str, root: Path, left_out: list[Path]) -> None:
    """Said: a user's .gif or .jfif photos would otherwise be missing from their class without a word. One is named
    under `name`, what ROOT is called (an archive's unpacked copy is in a temporary folder)."""
    if left_out:
        such_as = f"{name}/{cli.shown(min(left_out).relative_to(root).as_posix())}"
        print(f"warning: {name}: {len(left_out)} image file(s) left out, of types not taken from folders "
              f"({', '.join(sorted({p.suffix.lower() for p in left_out}))}; such as {such_as}): "
              f"convert them to one of {', '.join(IMAGE_EXTENSIONS)} to use them", file=sys.stderr)


def folder_entries(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError as e:
        raise cli.DataError(f"{cli.shown(folder)}: cannot read this folder ({e.strerror or e})",
                            "check its permissions or remove it") from None


# --------------------------------------------------------------------------- class folders

@dataclass
class ImageSet:
    """A split's images and labels, or some rows of them (a validation split or --limit: rows, not a copy)."""
    images: torch.Tensor  # N x 3 x S x S uint8: a memory-mapped cache, or a copy on the device
    labels: torch.Tensor  # int64, one per row of `rows` (or of `images`)
    classes: list[str]
    fingerprint: str = ""  # of the files decoded (names, sizes, times), kept by a subset: they are its source
    rows: torch.Tensor | None = None  # CPU int64 rows of `images` in this set; None: all of them, in order
    device: torch.device | None = None  # where batches go; None: the images' device

    def subset(self, indices: torch.Tensor) -> "ImageSet":
        indices = indices.cpu()
        rows = indices if self.rows is None else self.rows[indices]
        return replace(self, labels=self.labels[indices.to(self.labels.device)], rows=rows)

    def to(self, device: torch.device) -> "ImageSet":
        """Resident: this set's rows copied to the device (airbench's way: the fastest path, when they fit)."""
        images = self.images.to(device, copy=True) if self.rows is None else self.images[self.rows].to(device)
        return ImageSet(images, self.labels.to(device), self.classes, self.fingerprint)

    def streamed(self, device: torch.device) -> "ImageSet":
        """Left where it is (memory-mapped): `batches` gathers each batch and copies it to `device` ahead of use."""
        return replace(self, labels=self.labels.cpu(), device=torch.device(device))

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def stored_size(self) -> int:
        return self.images.shape[-1]

    @property
    def nbytes(self) -> int:
        return len(self) * self.images[0].numel()

    def batches(self, order: torch.Tensor | None, start: int, batch_size: int, share: slice = slice(None)
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) on `device` of steps `start`, `start` + 1, ... of `order` (positions in this set; None:
        in turn), each step `batch_size` positions of which this process gathers only its `share`. Resident sets
        index the device copy, streamed ones are gathered ahead (see prefetched): the same rows either way."""
        resident = self.device is None  # streamed also on the CPU: the same thread and gathering as on CUDA
        # in turn: positions on the images' device (a CPU index into CUDA images is a blocking copy at each batch)
        positions = torch.arange(len(self), device=self.images.device) if order is None else order
        positions = positions if resident else positions.cpu()
        steps = [positions[i:i + batch_size][share] for i in range(start * batch_size, len(positions), batch_size)]
        if not resident:
            yield from self.prefetched(steps)
            return
        rows = None if self.rows is None else self.rows.to(positions.device)  # once, not each step
        for picked in steps:
            yield self.images[picked if rows is None else rows[picked]], self.labels[picked]

    def prefetched(self, steps: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Each step gathered from the mapped file by a background thread, PREFETCH steps ahead, and on CUDA copied
        to `device` on a side stream, so that reading and copying overlap the steps in use; the consumer waits only
        for its own batch's copy. Stopped early, the steps not begun are cancelled, the one begun waited for."""
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None
        # the thread's own current device: else pinning and copies open GPU 0
        set_device = torch.cuda.set_device if cuda and self.device.index is not None else None
        thread = ThreadPoolExecutor(1, "batch-prefetch", set_device, (self.device,))
        try:
            ahead = [thread.submit(self.gather, picked, stream) for picked in steps[:PREFETCH]]
            for later in range(PREFETCH, len(steps) + PREFETCH):
                if later < len(steps):
                    ahead.append(thread.submit(self.gather, steps[later], stream))
                images, labels, copied = ahead.pop(0).result()  # raises what the gathering raised
                if cuda:
                    torch.cuda.current_stream(self.device).wait_event(copied)
                    images.record_stream(torch.cuda.current_stream(self.device))
                    labels.record_stream(torch.cuda.current_stream(self.device))
                yield images, labels
        finally:
            thread.shutdown(wait=True, cancel_futures=True)

    def gather(self, picked: torch.Tensor, stream: "torch.cuda.Stream | None"
               ) -> tuple[torch.Tensor, torch.Tensor, "torch.cuda.Event | None"]:
        """Positions `picked` of this set; with a CUDA `stream`, pinned and copied on it, with the event it records."""
        rows = picked if self.rows is None else self.rows[picked]
        images = torch.empty((len(rows), *self.images.shape[1:]), dtype=torch.uint8, pin_memory=stream is not None)
        torch.index_select(self.images, 0, rows, out=images)
        if stream is None:
            return images, self.labels[picked], None
        with torch.cuda.stream(stream):
            labels = self.labels[picked].pin_memory().to(self.device, non_blocking=True)
            images = images.to(self.device, non_blocking=True)
        return images, labels, stream.record_event()


class NoDataFolder(cli.DataError):
    """The folder named is no data set (missing, a URL, without train/ or test/): a script adds how to name another."""


def scan_class_folders(root: Path, name: str | None = None) -> tuple[list[str], list[tuple[Path, int]]]:
    """ImageFolder's layout: one folder per class, sorted; hidden and non-image files skipped. `name` is what
    messages call `root` (default: its path)."""
    name = name or cli.shown(root)
    if not root.is_dir():
        what = "a file, not a folder" if root.exists() else "no such folder"  # "no such" of a file misleads
        raise NoDataFolder(f"{name}: {what}", "expected a folder of class folders")
    classes = sorted(p.name for p in folder_entries(root) if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise cli.DataError(f"{name}: no class folders inside", f"expected {name}/<class>/<image> files")
    if {"test", "train"} <= set(classes):  # a whole data folder: "classes", each image labelled by its split
        raise cli.DataError(f"{name}: a data folder (train/ and test/), not one split's class folders",
                            f"pass {name}/train or {name}/test")
    samples, left_out = [], []
    above = frozenset([root.resolve(), *root.resolve().parents])  # a class folder linked to one: a loop
    for label, folder in enumerate(classes):
        files, skipped = image_files(root / folder, above)
        if not files:
            raise cli.DataError(f"{name}/{cli.shown(folder)}: class folder has no images "
                                f"({', '.join(IMAGE_EXTENSIONS)})", "add images or remove the folder")
        samples += [(p, label) for p in files]
        left_out += skipped
    warn_left_out(name, root, left_out)
    if len(classes) == 1:  # training would reach 100 % by always answering the one class
        raise cli.DataError(f"{name}: only one class folder ({cli.shown(classes[0])})",
                            "a classifier needs at least two: add a folder of images for each other class")
    return classes, samples


def scan_dataset(data_dir: Path, name: str | None = None) -> dict[str, tuple[list[str], list[tuple[Path, int]]]]:
    """train/ and test/ scanned (see scan_class_folders), checked to have the same class folders."""
    name = name or cli.shown(data_dir)
    if URL.match(str(data_dir)) and not data_dir.exists():
        raise NoDataFolder(f"{name}: a URL, not a folder", "download it into a folder first")
    for split in ("train", "test"):
        if not (data_dir / split).is_dir():
            raise NoDataFolder(f"{name}: no {split}/ folder", "a data folder holds train/<class>/ and test/<class>/")
    scans = {split: scan_class_folders(data_dir / split, f"{name}/{split}") for split in ("train", "test")}
    train, test = scans["train"][0], scans["test"][0]
    if train != test:
        only_train, only_test = (", ".join(map(spelled, sorted(set(one) - set(other)))) or "none"
                                 for one, other in ((train, test), (test, train)))
        raise cli.DataError(f"{name}: train/ and test/ have different class folders (only in train: {only_train}; "
                            f"only in test: {only_test})", "each class needs images in both: rename a folder spelled "
                            "otherwise, or move some of a class's images into the other split's folder of its name")
    return scans


def alike(name: str) -> str:
    """A class name compared loosely: case and Unicode normalisation ignored (macOS spells names decomposed)."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFD", name).casefold())


def spelled(name: str) -> str:
    """A class name as messages show it; with its code points when not in NFC, so that names printed alike differ."""
    return cli.shown(name) if unicodedata.is_normalized("NFC", name) else f"{cli.shown(name)} (not NFC: {ascii(name)})"


def fingerprint(samples: list[tuple[Path, int]], classes: list[str], size: int | None, root: Path) -> tuple[str, str]:
    """Of the files under `root` (names relative to it: the same folder named relatively or absolutely, or moved,
    has the same fingerprint), sizes and mtimes: what a resume compares. And the cache's key, adding SIDE_RULE without
    `size`, and each file's inode and ctime: a file replaced by one of the same size and mtime (any program sets an
    mtime; none a ctime) changes it, as a chmod or copy does. On Windows (st_ino may be 0, st_ctime is the creation
    time) it sees less, never more."""
    files = hashlib.sha256(f"{CACHE_VERSION}\n{classes}\n{size}\n".encode())
    identities = hashlib.sha256(b"" if size else f"{SIDE_RULE}\n".encode())
    skip = len(root.parts)  # a name: its path's parts after root's (path.relative_to parsed root anew for each file)
    for path, label in samples:
        info = path.stat()
        name = os.fsencode(os.path.join(*path.parts[skip:]))  # bytes: a name that is not UTF-8 cannot be text
        files.update(name + f"\0{label}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
        identities.update(f"{info.st_ino}\0{info.st_ctime_ns}\n".encode())
    identities.update(files.hexdigest().encode())  # the key changes whenever the fingerprint does
    return files.hexdigest(), identities.hexdigest()


def load_folder(root: str | os.PathLike, size: int | None = None, cache: bool = True,
                scanned: tuple[list[str], list[tuple[Path, int]]] | None = None) -> ImageSet:
    """A class-folder split as a memory-mapped uint8 file N x 3 x S x S at `size` (default: the median shorter side,
    at most 256), cached in `<root>/../.cache/` (or see cache_folder) as `<name>.u8` and `<name>.json` (the
    fingerprint's key, shape, checksum), used only while both hold. Without `cache`: a temporary file gone with the set.
    `scanned`: scan_class_folders(root), when the caller has it."""
    root = Path(root)
    classes, samples = scanned or scan_class_folders(root)
    files, key = fingerprint(samples, classes, size, root)
    image_file = root.parent / ".cache" / f"{root.name}.u8"
    damaged: list[Path] = []
    images = read_cache(image_file, key, damaged) if cache else None
    if cache and images is None and (elsewhere := cache_folder(root.parent)) != image_file.parent:
        image_file = elsewhere / image_file.name
        images = read_cache(image_file, key, damaged)
    if images is None:
        for path in damaged:  # said only when decoded: a read-only folder's damaged cache, its copy valid, is not
            print(f"warning: {cli.shown(path)}: the image cache is damaged (not the length or the pixels it was "
                  "built with); decoding the images again", file=sys.stderr)
        images, published = decode_all([p for p, _ in samples], size, image_file if cache else None)
        if published:  # the metadata makes it trusted
            record = {"version": CACHE_VERSION, "key": key, "shape": list(images.shape), "checksum": checksum(images)}
            try:
                cli.write_atomically(image_file.with_suffix(".json"), lambda f: f.write(json.dumps(record).encode()))
            except OSError as e:
                cache_warning(image_file.with_suffix(".json"), e)
    return ImageSet(torch.from_numpy(images), torch.tensor([label for _, label in samples]), classes, files)


@functools.cache  # decided once per data folder, and said once
def cache_folder(data_folder: Path) -> Path:
    """Where the image cache of a data folder is written: its .cache/, or where that cannot be written (a read-only
    data set, a file named .cache) the user's cache folder (XDG_CACHE_HOME, ~/.cache), else the temporary folder,
    in a folder named after the data folder's real path. One warning line says which."""
    own, problem = data_folder / ".cache", None
    name = hashlib.sha256(os.fsencode(data_folder.resolve())).hexdigest()[:16]
    users = os.environ.get("XDG_CACHE_HOME", "")
    users = users if os.path.isabs(users) else os.path.expanduser("~/.cache")  # as the XDG spec: a relative one unset
    for folder in (own, *(Path(parent) / "alexnet-image-cache" / name for parent in (users, tempfile.gettempdir()))):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()  # a real write: permissions alone miss a read-only mount
            break
        except OSError as e:
            problem = problem or e.strerror or str(e)
    if folder != own:
        print(f"warning: cannot write the image cache in {cli.shown(own)} ({problem}); it goes to {cli.shown(folder)}",
              file=sys.stderr)
    return folder


def read_cache(image_file: Path, key: str, damaged: list[Path]) -> np.memmap | None:
    """The cached images, mapped, if their metadata has this key; a file of another length or checksum than the
    metadata's is damaged: added to `damaged`, and rebuilt like a stale one."""
    try:
        record = json.loads(image_file.with_suffix(".json").read_bytes())
        shape = tuple(record["shape"])
        if record.get("version") != CACHE_VERSION or record.get("key") != key or len(shape) != 4:
            return None
        if image_file.stat().st_size == math.prod(shape):  # never mapped past its end
            images = np.memmap(image_file, np.uint8, "c", shape=shape)
            if checksum(images) == record["checksum"]:
                return images
    except (OSError, ValueError, KeyError, TypeError):  # missing or damaged metadata: rebuilt, never trusted
        return None
    damaged.append(image_file)
    return None


def checksum(images: np.ndarray) -> str:
    """The sha256 of its chunks' sha256s: hashlib lets go of the GIL, so they hash on all the CPUs, never held whole."""
    flat = memoryview(images.reshape(-1))
    with ThreadPoolExecutor(WORKERS) as pool:
        chunks = pool.map(lambda start: hashlib.sha256(flat[start:start + CHUNK]).digest(), range(0, len(flat), CHUNK))
        return hashlib.sha256(b"".join(chunks)).hexdigest()


def decode_all(paths: list[Path], size: int | None, target: Path | None) -> tuple[np.memmap, bool]:
    """Every image decoded at `size` (None: the median shorter side, guessed from a sample and decoded again if
    wrong) into a mapped file: `target`, renamed into place when complete (then True), else a temporary one."""
    guess = size or typical_side([decode(p, 1)[1] for p in paths[:: max(1, len(paths) // 64)]])
    shape = (len(paths), 3, guess, guess)
    tmp, beside = new_image_file(target, shape)
    try:
        sides = decode_into(tmp, paths, shape)
        if size is None and typical_side(sides) != guess:
            tmp.unlink()
            return decode_all(paths, typical_side(sides), target)
        images = np.memmap(tmp, np.uint8, "c", shape=shape)  # before the rename: another build may replace target
        if beside:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            # the old cache's metadata goes first: never paired with new images; kept until then (a refused build)
            target.with_suffix(".json").unlink(missing_ok=True)
            os.replace(tmp, target)
            tmp = target
    finally:
        if tmp != target:
            tmp.unlink(missing_ok=True)  # a mapping outlives its file's name; a failed build leaves nothing
    return images, tmp == target


def new_image_file(target: Path | None, shape: tuple[int, ...]) -> tuple[Path, bool]:
    """An empty file of the images' size, its disk space given up front (see allocate), beside `target` (then True),
    else in the temporary folder; named as cli.write_atomically's, so that the next build removes a killed one's."""
    name = "images.u8" if target is None else target.name
    for beside, folder in ([] if target is None else [(True, target.parent)]) + [(False, Path(tempfile.gettempdir()))]:
        path = None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, path = cli.temporary_file(str(folder), name)
            try:
                allocate(fd, math.prod(shape))
            finally:
                os.close(fd)
            return Path(path), beside
        except BaseException as e:  # a Ctrl-C while gigabytes are allocated too: the file goes
            if path is not None:
                Path(path).unlink(missing_ok=True)
            if not isinstance(e, OSError):
                raise
            if not beside:
                raise cli.DataError(f"{cli.shown(folder)}: cannot hold the decoded images ({e.strerror or e}, "
                                    f"{math.prod(shape) / 1e9:.1f} GB)", "free disk space or set TMPDIR") from None
            cache_warning(target, e)


def allocate(fd: int, size: int) -> None:
    """The file's `size` bytes given disk space now: posix_fallocate where there is one (Linux), else written as
    zeros (a file only made longer has none yet, and a full disk would be a SIGBUS in a process writing it)."""
    if hasattr(os, "posix_fallocate") and size:  # EINVAL for 0 (for which nothing is written either)
        return os.posix_fallocate(fd, 0, size)
    zeros = memoryview(bytes(min(size, CHUNK)))
    with open(fd, "wb", closefd=False) as f:
        for start in range(0, size, CHUNK):
            f.write(zeros[:size - start])


def cache_warning(path: Path, error: OSError) -> None:  # a read-only or full data folder still trains, slower to start
    print(f"warning: cannot write the image cache {path} ({error.strerror or error}); decoding every run",
          file=sys.stderr)


def decode_into(path: Path, paths: list[Path], shape: tuple[int, ...]) -> list[int]:
    """`paths` decoded into rows of the uint8 file `path` of `shape`; returns each image's shorter side. Decoding is
    Python-bound: processes, each writing its rows to the file; they end with this one (see die_with_parent)."""
    starts = range(0, len(paths), DECODE_CHUNK)
    tasks = (functools.partial(decode_rows, path, shape), starts, [paths[i:i + DECODE_CHUNK] for i in starts])
    if len(starts) <= 1 or WORKERS <= 1 or multiprocessing.current_process().daemon:  # (a Pool's) has no children
        return [side for sides in map(*tasks) for side in sides]
    pool = ProcessPoolExecutor(WORKERS, initializer=die_with_parent)
    try:
        # A stop signal while the pool forks its processes: handled in an os.fork hook, its KeyboardInterrupt was
        # dropped (cli.stop_where_raised), and one raised in the pool's own start left processes that no thread would
        # end: the exit waited for them forever. Held until every task is handed over (map submits them all).
        with cli.stops_held():
            results = pool.map(*tasks)
        return [side for sides in results for side in sides]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def decode_rows(path: Path, shape: tuple[int, ...], start: int, paths: list[Path]) -> list[int]:
    """Rows `start`, `start` + 1, ... of the file: only they are mapped here."""
    images = np.memmap(path, np.uint8, "r+", offset=start * math.prod(shape[1:]), shape=(len(paths), *shape[1:]))
    sides = []
    for row, image_path in enumerate(paths):
        pixels, side = decode(image_path, shape[-1])
        images[row] = pixels.transpose(2, 0, 1)
        sides.append(side)
    images.flush()  # written back now: the pages can be dropped, the memory held stays bounded
    return sides


def die_with_parent() -> None:
    """A decoding process's start: it ends when the pool's process ends (even by SIGKILL), not left holding memory
    and the --out lock's file; Ctrl-C is the parent's. Under every start method and system: a thread watches the
    parent's sentinel (Windows, spawn) and whether this process was handed to another parent (POSIX: under fork,
    siblings hold the sentinel's pipe open; under forkserver the parent is the server)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in cli.stop_signals():  # a forked worker's copy of the parent's (cli.run_script's, cli.stops_held's): the
        signal.signal(sig, signal.SIG_DFL)  # pool's terminate() and a process group's SIGTERM or SIGHUP end it
    parent = multiprocessing.parent_process()
    if parent is None or not parent.is_alive():
        os._exit(1)
    threading.Thread(target=watch_parent, args=(parent.sentinel, os.getppid()), daemon=True,
                     name="watch-parent").start()


def watch_parent(sentinel: int, ppid: int) -> None:
    while not multiprocessing.connection.wait([sentinel], WATCH_INTERVAL) and os.getppid() == ppid:
        pass
    os._exit(1)


def typical_side(sides: list[int]) -> int:
    """The median shorter side, at most MAX_STORED_SIZE. Not the most common one: where no two photos share a size it
    is any one's, and a few thumbnails of one size would set it for the hundreds of photos beside them."""
    return min(sorted(sides)[len(sides) // 2], MAX_STORED_SIZE)


def load_dataset(data_dir: str | os.PathLike, stored_size: int | None = None) -> tuple[ImageSet, ImageSet]:
    """The train and test splits of a data folder, with the same classes, stored at `stored_size` (see load_folder)."""
    data_dir = Path(data_dir)
    scans = scan_dataset(data_dir)  # both splits are checked before the long decoding starts
    train = load_folder(data_dir / "train", size=stored_size, scanned=scans["train"])
    return train, load_folder(data_dir / "test", size=train.stored_size, scanned=scans["test"])


def stratified_split(labels: torch.Tensor, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` indices in the class proportions of `labels` (see stratified_quota), and the rest; the same every run."""
    generator, labels = torch.Generator().manual_seed(seed), labels.cpu()
    picked, rest = [], []
    for cls, share in enumerate(stratified_quota(torch.bincount(labels), count).tolist()):
        members = (labels == cls).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        picked.append(members[:share])
        rest.append(members[share:])
    return torch.cat(picked).sort().values, torch.cat(rest).sort().values


def stratified_quota(per_class: torch.Tensor, count: int) -> torch.Tensor:
    """Each class's picks of `count`: floor(count * share), plus one for the largest remainders (stratified_split);
    then one for each class of two images or more left none, while a class has two picks to give (a rare class's
    images validated too)."""
    exact = count * per_class.double() / int(per_class.sum())
    quota = exact.floor().long()
    remainders = (exact - quota).argsort(descending=True, stable=True)
    quota[remainders[: count - int(quota.sum())]] += 1
    for cls in ((quota == 0) & (per_class > 1)).nonzero().flatten().tolist():
        if quota.max() > 1:
            quota[quota.argmax()] -= 1
            quota[cls] += 1
    return quota


def place(images: ImageSet, device: torch.device, stream: str) -> ImageSet:
    """--stream: a set that fits is copied to the device whole (never, or auto within half its free memory, the rest
    being the model's and the batches'); a larger one (or always) streams from the mapped file (see batches)."""
    if stream == "always" or (stream == "auto" and images.nbytes > cli.free_memory(device) / 2):
        return images.streamed(device)
    return images.to(device)


class Loader:
    """`for images, labels in loader:` for a training loop of one's own (airbench's CifarLoader shape): `epochs`
    passes over `source` (a class-folder split, cached by load_folder, or an ImageSet) in batches on `device`,
    augmented (`train`: see train_batch) or centre-cropped (eval_batch), reshuffled each pass if `shuffle` (default:
    `train`); `drop_last` leaves out a short last batch. `seed` fixes the draws, made as pretrain.py makes them."""

    def __init__(self, source: str | os.PathLike | ImageSet, batch_size: int, size: int, device: str = "cpu",
                 train: bool = True, epochs: int = 1, shuffle: bool | None = None, drop_last: bool = False,
                 augmentation: str = "rrc", cutout: float = 0.0, seed: int = 0) -> None:
        for name, value, least in (("batch_size", batch_size, 1), ("size", size, 1), ("epochs", epochs, 0)):
            if value < least:  # checked here, not at the first batch (or never: a negative batch size gave none)
                raise ValueError(f"Loader: {name} must be at least {least}, got {value}")
        if augmentation not in AUGMENTATIONS:
            raise ValueError(f"Loader: augmentation {augmentation!r} is none of {', '.join(sorted(AUGMENTATIONS))}")
        if not 0 <= cutout < 1:  # 1 and more blanked every image (16, as pixels, is a likely slip)
            raise ValueError(f"Loader: cutout must be at least 0 and below 1 (a share of the side), got {cutout}")
        try:  # before the decoding: a name torch does not know, a CUDA or MPS this machine lacks
            self.device = torch.device(device)
            torch.empty(0, device=self.device)
        except (RuntimeError, AssertionError):  # AssertionError: a torch built without CUDA
            raise ValueError(f"Loader: device {device!r} is no device name, or none this machine has; pass e.g. "
                             "'cpu', 'cuda' or 'mps'") from None
        images = source if isinstance(source, ImageSet) else load_folder(source)
        if drop_last and epochs and len(images) < batch_size:
            raise ValueError(f"Loader: drop_last with batch_size {batch_size} leaves no batch of {len(images)} images")
        self.images = place(images, self.device, "auto")
        self.classes = images.classes
        self.batch_size, self.size, self.train, self.epochs = batch_size, size, train, epochs
        self.shuffle = train if shuffle is None else shuffle
        self.drop_last, self.augmentation, self.cutout = drop_last, augmentation, cutout
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def __len__(self) -> int:  # batches in all `epochs`
        return self.epochs * (math.floor if self.drop_last else math.ceil)(len(self.images) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.images)
        for _ in range(self.epochs):
            order = (torch.randperm(n, generator=self.generator, device=self.device) if self.shuffle
                     else torch.arange(n, device=self.device))
            kept = n - n % self.batch_size if self.drop_last else n
            with contextlib.closing(self.images.batches(order[:kept], 0, self.batch_size)) as batches:
                for images, labels in batches:
                    yield (train_batch(images, self.size, self.generator, augmentation=self.augmentation,
                                       cutout=self.cutout) if self.train else eval_batch(images, self.size)), labels


# --------------------------------------------------------------------------- transforms on the device

def constants(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """float32 `values` on `device`, made once per device, not per batch: on CUDA torch.tensor's copy is a blocking
    one (the host waits for all the GPU has queued); anew while torch.export or torch.compile trace (theirs)."""
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=torch.float32, device=device)
    return device_constants(values, device)


@functools.cache
def device_constants(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def normalize(images: torch.Tensor) -> torch.Tensor:
    mean, std = (constants(values, images.device).view(1, 3, 1, 1) * 255 for values in (MEAN, STD))
    return (images - mean) / std


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, size: int, black_outside: bool = False) -> torch.Tensor:
    """Bilinear crop-and-resize of box (x1, y1, x2, y2) of each image to size x size: torchvision's roi_align (aligned,
    adaptive sampling) as two matrix products, in torch alone (importing torchvision costs a second at each start);
    at its outermost half-pixel a crop reads the neighbouring pixels, not a repeated edge (see sampling_weights).
    `black_outside`: as if the image were padded with black (roi_align repeats its edge for half a pixel out)."""
    rows, columns = (sampling_weights(boxes[:, i], boxes[:, i + 2], images.shape[-1 - i], size, black_outside)
                     for i in (1, 0))
    return rows.unsqueeze(1) @ images.to(rows.dtype) @ columns.transpose(1, 2).unsqueeze(1)  # torch's default dtype


def sampling_weights(start: torch.Tensor, end: torch.Tensor, length: int, size: int, black_outside: bool = False
                     ) -> torch.Tensor:
    """N x size x length: output pixel i averages ceil(box side / size) bilinear samples spread over its share of the
    box, a sample over a pixel outside the image counting 0. At most ceil(length / size) samples (a box is at most the
    image's side): a shape known without reading the boxes, so no wait for the device."""
    start, end = start.view(-1, 1, 1) - 0.5, end.view(-1, 1, 1) - 0.5
    step = (end - start) / size
    count = torch.ceil(step).clamp(min=1)
    sample = torch.arange(-(-length // size), device=start.device)
    # in roi_align's order of operations: a sample on the image's far edge is in or out as there
    at = start + torch.arange(size, device=start.device).view(1, -1, 1) * step + (sample + 0.5) * step / count
    weight = ((black_outside | (at >= -1) & (at <= length)) & (sample < count)) / count  # N x size x samples
    # bilinear: weight 1 - distance to the two nearest pixels; roi_align's sample beyond an edge pixel reads that pixel
    distance = ((at if black_outside else at.clamp(0, length - 1)).unsqueeze(-1)
                - torch.arange(length, device=start.device)).abs()
    return (weight.unsqueeze(-1) * (1 - distance).clamp(min=0)).sum(2)


def random_resized_boxes(n: int, side: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """torchvision's RandomResizedCrop.get_params at its defaults (scale 0.08 to 1, ratio 3/4 to 4/3) for a batch of
    side x side images: each tries 10 (area, aspect) draws and keeps the first that fits, else the whole image."""
    area, log_aspect = (low + (high - low) * torch.rand(n, 10, generator=generator, device=device)
                        for low, high in ((0.08, 1.0), (np.log(3 / 4), np.log(4 / 3))))
    area, aspect = side * side * area, torch.exp(log_aspect)
    w, h = torch.sqrt(area * aspect).round(), torch.sqrt(area / aspect).round()
    fits = (w > 0) & (w <= side) & (h > 0) & (h <= side)
    first, found = fits.long().argmax(1, keepdim=True), fits.any(1)
    w, h = (torch.where(found, drawn.gather(1, first).squeeze(1), float(side)) for drawn in (w, h))
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
                augmentation: str = "rrc", cutout: float = 0.0, batch: int | None = None) -> torch.Tensor:
    """A crop (see AUGMENTATIONS) resized to size, a horizontal flip, normalisation, then cutout (DeVries & Taylor,
    2017: a square of side `cutout` x size centred anywhere, clipped at the edges, set to the mean colour, 0 after
    normalisation), on images' device. `images` are `part` of a global batch of `batch` (default: all of it): the
    draws are made for the whole batch, so processes that share one augment it as one process would."""
    n = batch or len(images)
    boxes = AUGMENTATIONS[augmentation](n, images.shape[-1], generator, images.device)[part]
    flip = (torch.rand(n, generator=generator, device=images.device) < 0.5)[part]
    x = crop_resize(images, boxes, size, black_outside=augmentation == "crop")  # the padded crop's border is black
    x = normalize(torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x))
    if cutout:
        side = round(cutout * size)
        start = torch.randint(size, (n, 2), generator=generator, device=images.device)[part] - side // 2
        pixel = torch.arange(size, device=images.device)
        inside = (pixel >= start[:, :, None]) & (pixel < start[:, :, None] + side)  # N x (rows, columns) x size
        x = x.masked_fill((inside[:, 0, :, None] & inside[:, 1, None, :])[:, None], 0.0)
    return x


def eval_batch(images: torch.Tensor, size: int, resize: float = EVAL_RESIZE) -> torch.Tensor:
    """Resize to `resize` x `size`, centre-crop `size`, normalise: one box, its weights broadcast to every image."""
    resized = int(size * resize)
    offset = round((resized - size) / 2)
    box = constants((offset, offset, offset + size, offset + size), images.device)
    return normalize(crop_resize(images, (box * images.shape[-1] / resized).view(1, 4), size))
