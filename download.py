"""Get a data set onto disk: the official CIFAR-10 (md5-checked), an archive or a folder of class folders.

    python download.py [--root data/cifar10] [--source URL|PATH] [--md5 HEX] [--test-size N]

A source of train/<class>/ and test/<class>/ folders is taken as it is; one of <class>/ folders alone (one's own
photos) is split: --test-size of its images, in each class's share, go to test/, the same ones every time.
"""
import signal

if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a Ctrl-C while torch loads: killed quietly (then cli.run_script's)

import argparse
import errno
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
import unicodedata
import urllib.error
import urllib.parse
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPException
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cli import (ArgumentParser, DataError, Lock, UsageError, check_tilde_expanded, guard_output, positive_int,
                 run_script, say_if_stdout_lost, shown, signal_of, special_kind)
from data import URL, WORKERS, folder_entries, scan_class_folders, scan_dataset, stratified_quota

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_DIR = "cifar-10-batches-py"  # the folder inside the official tarball
# An archive declaring more is refused (a zip bomb unpacks MBs to TBs); a data set that large would not fit decoded.
MAX_UNPACKED_BYTES = 16 * 2**30


def download(root: str | os.PathLike, source: str | None = None, md5: str | None = None,
             test_size: int | None = None) -> Path:
    """Make ROOT/train/<class>/ and ROOT/test/<class>/ from the official CIFAR-10 or another source, in a temporary
    folder beside ROOT renamed into place once complete (a failure or an interruption leaves nothing). A lock beside
    ROOT lets one download at a time work there: a temporary folder its holder finds, a killed download's, goes."""
    root, given = Path(root), source
    try:  # a name too long, a folder above that cannot be searched: one line, as for --out
        in_the_way = next((path for path in (root, *root.parents) if path.exists() and not path.is_dir()), None)
    except OSError as e:
        raise DataError(f"--root {root}: cannot reach it ({e.strerror or e})", "choose another --root") from None
    if in_the_way is not None:
        raise DataError(f"--root {root}: {'it' if in_the_way == root else in_the_way} is a file, not a folder",
                        "choose another --root")
    source, md5 = checked_source(source, md5)
    scans, problem = scanned(root)
    if root.name in ("", "..") and problem is not None:  # ".", "..", "/": no name to build beside
        raise DataError(f"--root {root}: is {root.resolve()}, named by '.' or '..' (or the top folder): the data set "
                        "is built beside a named --root, then renamed to it",
                        "pass the name of a folder to create, e.g. --root data/cifar10")
    if problem is not None or partial_folders(root):  # a complete ROOT needs no lock: it may be read-only
        with download_lock(root):
            remove_partial_folders(root)  # a killed download's: they may hold gigabytes
            try:
                scans, problem = scanned(root)
                if problem is not None:
                    return make_root(root, source, md5, test_size, problem)
            finally:
                remove_partial_folders(root)  # this one's, also when a signal came as mkdtemp returned
    made_from = kept_source(root, given, test_size, len(scans["test"][1]))
    print(f"{root} already holds train/ and test/{made_from}; nothing to do")
    return root


# In ROOT, written with the data set and renamed into place with it: the --source it was made from (source_name).
SOURCE_RECORD = ".source"


def source_name(source: str) -> str:
    """A --source as ROOT's record holds it: a URL as given, a path absolute (the same file named from elsewhere)."""
    return source if is_url(source) else str(Path(source).resolve())


def kept_source(root: Path, given: str | None, test_size: int | None, held: int) -> str:
    """What the data set in ROOT (`held` test images) was made from, for the "nothing to do" line. Another --source (or
    --test-size) is refused, not fetched over it: checkpoints, resume states and caches were made from this set; a
    mistyped one would delete gigabytes."""
    if test_size is not None and held != test_size:  # never "remove it": made by hand, it may be one's only copy
        raise DataError(f"--root {root}: holds {held} test images, not --test-size {test_size}",
                        f"pass --test-size {held} (or none), or choose another --root for a new split")
    try:
        recorded = os.fsdecode((root / SOURCE_RECORD).read_bytes())
    except OSError:  # made by hand, or by a download.py that kept no record
        return "" if given is None else f" (its source is not recorded: --source {given} is not used)"
    if given is not None and source_name(given) != recorded:
        raise DataError(f"--root {root}: holds the data set made from {recorded}, not from --source {given}",
                        "remove the folder to download this one into it, or choose another --root")
    if Path(recorded).is_dir():  # one's photos: a photo added since would be in neither split without a word
        return f" (made from {recorded}; what changed there since is not taken: remove {root} to take it)"
    return f" (made from {recorded})"


def is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in ("http", "https", "ftp")


def checked_source(source: str | None, md5: str | None) -> tuple[str, str | None]:
    """The official tarball and its md5 by default; an md5 in lower case, as hexdigest gives it. A --source
    naming nothing on disk that is a URL of a scheme not fetched (file:, s3:) is said to be one, not "no such file"."""
    if source is None:
        return CIFAR10_URL, CIFAR10_MD5
    try:
        parts = urllib.parse.urlparse(source)
    except ValueError as e:  # "http://[x/a.tgz": a bracket opened in the host and not closed
        raise DataError(f"--source {source}: not a valid URL ({e})",
                        "correct it, or pass an archive or a folder") from None
    if not is_url(source) and not Path(source).exists():
        if parts.scheme == "file":
            raise DataError(f"--source {source}: a file: URL",
                            f"pass the path itself: --source {urllib.parse.unquote(parts.path)}")
        if URL.match(source):
            raise DataError(f"--source {source}: a URL download.py does not fetch ({parts.scheme}:)",
                            "pass an http, https or ftp URL, or download it first and pass the archive or folder")
        raise DataError(f"--source {source}: no such file or folder", "pass a URL, an archive or a folder")
    if md5 is not None and not is_url(source) and Path(source).is_dir():
        raise DataError(f"--md5 {md5}: --source {source} is a folder, which has no checksum",
                        "drop --md5, or pass an archive")
    return source, None if md5 is None else md5.lower()


def scanned(root: Path) -> tuple[dict | None, str | None]:
    """ROOT's scan_dataset and None, or None and what keeps it from being a complete data set (ROOT named by its last
    part): a "nothing to do" reads its test images' count from the one scan (CIFAR-10's 60,000 files take a second)."""
    try:
        return scan_dataset(root, root.name), None
    except DataError as e:
        return None, e.problem


def partial_folders(root: Path) -> list[Path]:
    """The temporary folders of downloads into ROOT (see download)."""
    return [p for p in folder_entries(root.parent) if p.name.startswith(f".{root.name}.partial-")]


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
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)  # not writing_failed's: a read-only disk is freed of nothing
        raise DataError(f"--root {root}: cannot write in {root.parent} ({e.strerror or e})",
                        "free space or choose another --root" if full else "choose another --root") from None


def make_root(root: Path, source: str, md5: str | None, test_size: int | None, problem: str) -> Path:
    """Build the data set in a temporary folder beside ROOT (the caller removes it), then rename it into place."""
    if root.is_symlink():  # the rename would replace the link, or fail on it
        raise DataError(f"--root {root}: is a link (to {os.readlink(root)}), which the data set would replace",
                        "pass the folder it points to, or another --root")
    if root.is_dir() and folder_entries(root):
        what = (f"an incomplete data set ({problem})" if (root / "train").exists() or (root / "test").exists()
                else "exists but holds no train/ and test/ folders")
        if (root / SOURCE_RECORD).is_file():  # a download's (renamed into place whole, its record in it), changed since
            raise DataError(f"--root {root}: {what}", "remove it and run again, or choose another --root")
        # No record: a user's own images (a class folder set without test/), never to be advised away
        mine = root / "train" if (root / "train").is_dir() else root
        advice = (f"pass --source {mine} and a new --root to split its class folders into train/ and test/ there"
                  if not (root / "test").exists() else "for images of your own, lay them out as train/<class>/ and "
                  "test/<class>/ (some of each class's images in test/)")
        raise DataError(f"--root {root}: {what}, with no record of a download in it ({SOURCE_RECORD})",
                        f"{advice}; else choose another --root")
    work = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.partial-"))
    scans = build_tree(source, md5, test_size, work, root)
    (work / "tree" / SOURCE_RECORD).write_bytes(os.fsencode(source_name(source)))
    if root.exists():
        root.rmdir()  # empty, checked above
    os.replace(work / "tree", root)
    classes, train = scans["train"]
    print(f"{root}: {len(train)} training and {len(scans['test'][1])} test images in {len(classes)} classes")
    say_if_stdout_lost("download.py", f"its lines are lost, the data set is written: {shown(root)}")
    return root


def build_tree(source: str, md5: str | None, test_size: int | None, work: Path,
               root: Path) -> dict[str, tuple[list[str], list[tuple[Path, int]]]]:
    """WORK/tree/train/ and test/ from a URL, archive or folder, and their scan_dataset; messages call WORK ROOT."""
    tree = work / "tree"
    if test_size is not None and source == CIFAR10_URL:  # before its download, not after (see the end)
        raise DataError(f"--test-size {test_size}: the official CIFAR-10 holds train/ and test/ already (10,000 test "
                        "images), taken as they are", "drop --test-size, or pass --source a folder or archive of class "
                        "folders alone to split")
    local = fetch(source, work) if is_url(source) else Path(source)
    if local.is_dir():
        if root.resolve().is_relative_to(local.resolve()):  # a later run would take it for some of the images
            raise DataError(f"--root {root}: inside --source {source}, among the images it is made from",
                            "choose a --root outside it")
        copy_class_folders(local, tree, source, test_size)
    else:
        if md5 is None:  # a folder has no checksum, and is not warned about
            print(f"warning: {source} is not checked against a checksum; pass --md5 to check it", file=sys.stderr)
        elif not local.is_file() or file_md5(local) != md5:  # a device or FIFO: never read to its end, if it has one
            raise DataError(f"{source}: checksum mismatch (expected md5 {md5}); the file is corrupt or not the one "
                            "expected: download it again or pass the right --md5")
        if unpack(local, work, root, source):
            copy_class_folders(work / "extract", tree, source, test_size, move=True)
    try:
        scans = scan_dataset(tree, source)
    except DataError as e:
        raise DataError(e.problem, "fix the source") from None
    if test_size is not None and len(scans["test"][1]) != test_size:  # not split: its own test/ taken
        raise DataError(f"--test-size {test_size}: {source} holds train/ and test/ already ({len(scans['test'][1])} "
                        "test images), taken as they are", "drop --test-size")
    return scans


def file_md5(path: Path) -> str:
    md5 = hashlib.md5(usedforsecurity=False)  # a checksum, no security: FIPS mode refuses md5 otherwise
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(2**20), b""):
            md5.update(chunk)
    return md5.hexdigest()


def fetch(url: str, work: Path) -> Path:
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    from torchvision.datasets.utils import download_url  # here: importing torchvision costs a second at start
    try:
        download_url(url, str(work), name)
    except (urllib.error.URLError, HTTPException, OSError) as e:
        raise DataError(f"{url}: download failed ({getattr(e, 'reason', e)}); check the network or pass --source "
                        "a local copy") from None
    return work / name


def unpack(archive: Path, work: Path, root: Path, source: str) -> bool:
    """The official python tarball into WORK/tree (False), or another .tar(.gz)/.zip into WORK/extract (True). A
    damaged compressed stream raises an OSError without errno, a full --root one with it (or naming a file in WORK)."""
    tree = work / "tree"
    try:
        if tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tar:
                members = tar.getmembers()
                check_unpacked_size(source, sum(m.size for m in members if m.isreg()), work)
                if f"{CIFAR10_DIR}/data_batch_1" in tar.getnames():
                    convert_cifar10(tar, tree, source)
                    return False
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
            shutil.rmtree(work / "extract" / "__MACOSX", ignore_errors=True)  # a Mac's zip: its files' metadata
        else:
            raise DataError(f"{source}: not a tar or zip archive, or an incomplete one; download it again, or pass "
                            "the CIFAR-10 python tarball or an archive or folder of train/ and test/ class folders")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, OSError) as e:
        if isinstance(e, OSError) and writing_failed(e, work):
            raise DataError(f"--root {root}: cannot write ({e.strerror or e})",
                            "free space or choose another --root") from None
        member = Path(os.fsdecode(getattr(e, "filename", None) or "/"))
        if member.is_relative_to(work / "extract"):  # the member's name, not the temporary folder's path
            e = f"{e.strerror}: {shown(member.relative_to(work / 'extract'))}"
        raise DataError(f"{source}: damaged or incomplete archive ({e})", "download it again") from None
    return True


def writing_failed(e: OSError, folder: Path) -> bool:
    """Whether `e` is the fault of where it writes (--root), not of what it copies or unpacks: a full or read-only
    disk, or a file inside FOLDER (an error about the archive names the archive, or no file)."""
    if e.errno in {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}:
        return True
    if e.errno in {errno.EISDIR, errno.ENOTDIR, errno.EEXIST}:  # into a new folder: members naming a folder and a file
        return False
    return e.filename is not None and Path(os.path.abspath(os.fsdecode(e.filename))).is_relative_to(folder.absolute())


def size_text(size: int) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def check_unpacked_size(source: str, size: int, work: Path) -> None:
    """Refuse an archive whose members declare more bytes than the limit or the free space where it unpacks. The
    declared sizes bound what unpacking writes: tarfile and zipfile stop a member there (zipfile then fails its CRC)."""
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
        for path in [name] + ([] if link is None else [os.path.join(os.path.dirname(name), link)]):
            normal = os.path.normpath(path.replace("\\", "/"))
            if os.path.isabs(path) or path.startswith(("/", "\\")) or normal == ".." or normal.startswith("../"):
                raise DataError(f"{source}: member {name!r} points outside the archive; refusing to unpack it",
                                MEMBER_ADVICE)


SPLIT_NAMES = {"train", "test", "val", "valid", "validation"}  # folders of a split, never class folders to split


def copy_class_folders(folder: Path, tree: Path, source: str, test_size: int | None, move: bool = False) -> None:
    """Find the folder holding train/ and test/ (it may be nested, e.g. cifar10/; never a hidden one) and bring it to
    `tree`; else the first holding two folders or more, as class folders to split, unless named as a split's (train/
    beside val/): refused, not split as classes named so, nor searched further (one split's would be taken alone)."""
    source = source.rstrip("/" + os.sep) or source  # "photos/" as typed: its folders named photos/a, not photos//a
    found_in = {folder: source}  # the folders searched, never a hidden one (.git/, .thumbnails/), and their names
    for found in [p for pattern in ("*", "*/*") for p in sorted(folder.glob(pattern)) if p.is_dir()]:
        inner = found.relative_to(folder)
        if not any(part.startswith(".") for part in inner.parts):
            found_in[found] = f"{source}/{inner.as_posix()}"
    for found, name in found_in.items():
        if (found / "train").is_dir() and (found / "test").is_dir():
            tree.mkdir()
            if move and not holds_links(found):  # nothing a move breaks: moved whole (60,000 files one by one: 5 s)
                for split in ("train", "test"):
                    shutil.move(found / split, tree / split)
                return
            # a folder's files, what the copy would fail on refused first; an archive's images, its folders checked
            files = ([path for _, samples in scan_dataset(found, name).values() for path, _ in samples] if move else
                     [path for split in ("train", "test") for path in source_files(found / split, source)])
            bring([(path, tree / path.relative_to(found)) for path in files], found, source, move)
            return
    for found, name in found_in.items():
        inside = {p.name for p in folder_entries(found) if p.is_dir() and not p.name.startswith(".")}
        if len(inside) < 2:
            continue
        if inside & SPLIT_NAMES:
            raise DataError(f"{name}: holds {' and '.join(f'{n}/' for n in sorted(inside & SPLIT_NAMES))}"
                            f"{' beside other folders' * bool(inside - SPLIT_NAMES)}: a split other than train/ and "
                            "test/ (or a class named so)", "lay it out as train/<class>/ and test/<class>/ (a val/ "
                            "may be renamed test/), or as <class>/ folders alone to split (a class named so renamed, "
                            "e.g. train/ to trains/)")
        split_class_folders(found, tree, name, test_size, move)
        return
    raise DataError(f"{source}: no train/ and test/ class folders found (looked two levels down); "
                    "lay it out as train/<class>/<image> and test/<class>/<image>, or as <class>/<image> to split")


def split_class_folders(folder: Path, tree: Path, name: str, test_size: int | None, move: bool) -> None:
    """FOLDER/<class>/ into TREE/train/<class>/ and TREE/test/<class>/: `test_size` images (default a fifth, at least
    one of each class) in each class's share (data.stratified_quota) to test/, those whose names hash lowest: the
    same on any system, and an image added moves others only at the edge (a shuffle would redraw every class)."""
    classes, samples = scan_class_folders(folder, name)
    per_class = torch.bincount(torch.tensor([label for _, label in samples]), minlength=len(classes))
    quota = stratified_quota(per_class, test_size or max(len(classes), round(len(samples) / 5))).tolist()
    for label, (count, held) in enumerate(zip(per_class.tolist(), quota)):
        if held == 0 or held >= count:
            raise DataError(f"{name}/{classes[label]}: {count} image{'s' * (count > 1)}, none left for "
                            f"{'test' if held == 0 else 'train'}/", "add images to it" if count == 1 else
                            "pass a smaller --test-size" if held else
                            f"pass a --test-size of at least {len(classes)}, one image of each class")
    copies, held = [], [0] * len(classes)
    for _, label, same in identical_groups(samples, folder):  # a group fills its class's quota whole, or trains
        split = "test" if held[label] + len(same) <= quota[label] else "train"
        held[label] += len(same) * (split == "test")
        copies += [(path, tree / split / path.relative_to(folder)) for path in same]
    # a --test-size is met exactly (a ROOT's test images are compared with it), a default at least in part
    if short := [label for label, count in enumerate(held) if count < quota[label] and (test_size or not count)]:
        raise DataError(f"{name}/{classes[short[0]]}: its share of test/ ({quota[short[0]]}) cannot be held out in "
                        "whole groups of copies (byte for byte; held out apart, a copy would be trained on too)",
                        "pass another --test-size, or remove the copies")
    bring(copies, folder, name, move)
    print(f"{name}: class folders alone, split: {sum(held)} of their {len(samples)} images held out as test/")


def identical_groups(samples: list[tuple[Path, int]], folder: Path) -> list[tuple[bytes, int, list[Path]]]:
    """Each class's images as groups of byte-identical files (a photo saved twice: one in test/ would be trained on
    in train/), in the order of their lowest name_hash; only files of a size another one has are read."""
    sizes: dict[tuple[int, int], list[Path]] = {}
    for path, label in samples:
        sizes.setdefault((label, path.stat().st_size), []).append(path)
    groups = []
    for (label, _), paths in sizes.items():
        contents: dict[str, list[Path]] = {}
        for path in paths:
            contents.setdefault(content_key(path) if len(paths) > 1 else "", []).append(path)
        groups += [(min(name_hash(p.relative_to(folder)) for p in same), label, same) for same in contents.values()]
    return sorted(groups)


def content_key(path: Path) -> str:
    try:
        return file_md5(path)
    except OSError:  # not grouped: its copy then says why it cannot be read
        return ""


def name_hash(path: Path) -> bytes:
    """Of a path's name, the same on every system: '/' between its parts, in NFC (macOS's names are NFD)."""
    return hashlib.sha256(unicodedata.normalize("NFC", path.as_posix()).encode("utf-8", "surrogateescape")).digest()


def bring(copies: list[tuple[Path, Path]], folder: Path, name: str, move: bool) -> None:
    """Copy each (path under FOLDER, to), or move it out of an archive's unpacked FOLDER: there a link (or a file in a
    linked folder) is copied as what it points to, before anything is moved (moved as a link, it would point to
    nothing once it or its target went elsewhere). A folder's links are always copied as what they point to."""
    real = folder.resolve()  # a path's own folders, not links (one resolve each: not one for each of 60,000 files)
    plain = {p for p in {path.parent for path, _ in copies} if p.resolve() == real / p.relative_to(folder)}
    linked = {path for path, _ in copies if move and (path.parent not in plain or path.is_symlink())}
    for path, to in sorted(copies, key=lambda copy: copy[0] not in linked):
        copy_file(path, to, name, move and path not in linked)


def holds_links(folder: Path) -> bool:
    """Whether a file or folder under FOLDER is a link (os.walk follows none)."""
    return any(os.path.islink(os.path.join(top, entry)) for top, folders, files in os.walk(folder)
               for entry in folders + files)


def copy_file(src: Path, dst: Path, source: str, move: bool = False) -> None:
    """Copy (or move) a file, its folder made, or make a folder; the first failure ends the copy (not hours on a full
    disk) as a DataError."""
    try:
        if src.is_dir():
            dst.mkdir()
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst) if move else shutil.copy2(src, dst)
    except OSError as e:
        advice = "free space or choose another --root" if writing_failed(e, dst.parent) else "fix or remove it"
        raise DataError(f"--source {source}: cannot copy {shown(src)} ({e.strerror or e})", advice) from None


def source_files(folder: Path, source: str, above: tuple[tuple[tuple[int, int], Path], ...] = ()) -> list[Path]:
    """`folder` and the folders and files under it, each folder first, links followed; refused: what the copy would
    fail on or never end (a link loop: `above` holds each folder above by (device, inode); a link that cannot be
    followed; what is neither a file nor a folder: a link to /dev/zero reads forever)."""
    info = folder.stat()
    above, found = (*above, ((info.st_dev, info.st_ino), folder)), [folder]
    with os.scandir(folder) as entries:  # closed also when a loop is refused
        entries = list(entries)
    for entry in entries:
        try:
            target = entry.stat()  # following links
        except OSError as e:  # a link to itself, to a link back to it, or to nothing (or a file gone meanwhile)
            what = "is a link that cannot be followed" if entry.is_symlink() else "cannot be read"
            raise DataError(f"--source {source}: {shown(entry.path)} {what} ({e.strerror})",
                            "remove it or make it point to a file or folder") from None
        if stat.S_ISDIR(target.st_mode):
            if back := [path for key, path in above if key == (target.st_dev, target.st_ino)]:
                raise DataError(f"--source {source}: {shown(entry.path)} is a link back to {shown(back[0])}, "
                                "a loop", "remove it")
            found += source_files(Path(entry.path), source, above)
        elif not stat.S_ISREG(target.st_mode):
            through = " (through a link)" if entry.is_symlink() else ""
            raise DataError(f"--source {source}: {shown(entry.path)} is {special_kind(target.st_mode)}{through}, "
                            "not a regular file or folder", "remove it")
        else:
            found.append(Path(entry.path))
    return found


class CifarUnpickler(pickle.Unpickler):
    """The official batches are pickles; allow only what numpy arrays need, never other code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def convert_cifar10(tar: tarfile.TarFile, tree: Path, source: str) -> None:
    """The official arrays as TREE/<split>/<class>/NNNN.png (NNNN: the index within the class), checked first."""
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
    try:
        return CifarUnpickler(io.BytesIO(tar.extractfile(f"{CIFAR10_DIR}/{name}").read()), encoding="latin1").load()
    except (KeyError, AttributeError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"{source}: {CIFAR10_DIR}/{name} is missing or damaged ({e}); "
                        "download the tarball again") from None


def not_official(source: str, name: str, what: str) -> DataError:
    return DataError(f"{source}: {CIFAR10_DIR}/{name} is not the official format ({what})", "download it again")


def cifar_classes(meta: object, source: str) -> list[str]:
    """batches.meta's label_names, checked to be folder names: unique, plain, not hidden (ImageFolder skips those)."""
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


def build_parser() -> argparse.ArgumentParser:
    """download.py's flags, also the `invoke download` task's."""
    parser = ArgumentParser(__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--root", type=path_text, default="data/cifar10", help="folder to create, holding train/ and test/")
    add("--source", type=path_text, default=None, help="URL, tarball, .tar.gz/.zip of class folders, or a folder "
        "(default: the official cifar-10-python.tar.gz, md5-checked)")
    add("--md5", type=md5_digits, default=None, help="expected md5 of a --source file (default: not checked)")
    add("--test-size", type=positive_int, default=None, help="images of a --source of class folders alone (no train/ "
        "and test/) held out as test/, in each class's share (default: a fifth, at least one of each class)")
    return parser


def main(argv: list[str] | None = None) -> None:
    guard_output()  # a closed stdout (`| head`) loses the closing line, not the data set
    args = build_parser().parse_args(argv)
    try:
        check_tilde_expanded("--root", Path(args.root))
        download(args.root, args.source, args.md5, args.test_size)
    except (DataError, UsageError) as e:
        sys.exit(f"download.py: {e}")
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM or SIGHUP (run_script): the temporary folder is already gone
        print(f"download.py: interrupted; nothing was written to {args.root}", file=sys.stderr)
        sys.exit(128 + signal_of(e))


if __name__ == "__main__":
    run_script(main)
