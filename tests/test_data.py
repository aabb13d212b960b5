import fcntl
import functools
import http.server
import io
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import tarfile
import threading
import zipfile
from pathlib import Path, PureWindowsPath

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
from torchvision.ops import roi_align
from PIL import Image

import cli
import data
import download
from conftest import QuietHTTPServer, class_folder_archive, error_line, make_class_folders, md5, refuse_listing, run

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def official_tarball(path: Path, per_batch: int = 12, seed: int = 0, changes: dict | None = None) -> dict:
    """A small cifar-10-python.tar.gz in the official format; returns the arrays it holds.

    `changes` doctors it: {member name: {key: value}} replaces those entries of that pickle's dictionary.
    """
    rng = np.random.default_rng(seed)
    changes = changes or {}
    batches = {}
    with tarfile.open(path, "w:gz") as tar:
        def add(name, obj):
            payload = pickle.dumps({**obj, **changes.get(name, {})}, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

        add("batches.meta", {"label_names": CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072})
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            batch = {"batch_label": name, "labels": rng.integers(0, 10, per_batch).tolist(),
                     "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                     "filenames": [f"{name}_{i}.png" for i in range(per_batch)]}
            add(name, batch)
            batches[name] = batch
    return batches


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """A loopback HTTP server for the files in tmp_path/www."""
    www = tmp_path / "www"
    www.mkdir()
    httpd = QuietHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()




def test_download_official_format_over_http_gives_identical_pixels(tmp_path, server):
    www, url = server
    batches = official_tarball(www / "cifar-10-python.tar.gz")
    root = tmp_path / "cifar10"
    result = run("download.py", "--root", root, "--source", f"{url}/cifar-10-python.tar.gz",
                 "--md5", md5(www / "cifar-10-python.tar.gz"))
    assert "60 training and 12 test images in 10 classes" in result.stdout
    for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        seen = {c: 0 for c in CLASSES}
        for name in names:
            batch = batches[name]
            for pixels, label in zip(batch["data"], batch["labels"]):
                png = root / split / CLASSES[label] / f"{seen[CLASSES[label]]:04d}.png"
                seen[CLASSES[label]] += 1
                assert np.array_equal(np.asarray(Image.open(png)), pixels.reshape(3, 32, 32).transpose(1, 2, 0))
        assert sum(seen.values()) == sum(1 for _ in (root / split).rglob("*.png"))
    again = run("download.py", "--root", root, "--source", f"{url}/cifar-10-python.tar.gz")
    assert "nothing to do" in again.stdout


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".cifar10"))


def test_checksum_mismatch_leaves_no_tree(tmp_path, server):
    www, url = server
    official_tarball(www / "cifar-10-python.tar.gz")
    root = tmp_path / "out" / "cifar10"
    result = run("download.py", "--root", root, "--source", f"{url}/cifar-10-python.tar.gz", "--md5", "0" * 32,
                 check=False)
    assert result.returncode == 1
    assert "checksum mismatch" in error_line(result)
    assert not root.exists() and leftovers(root.parent) == []


def test_the_official_source_is_always_checked(tmp_path, server, monkeypatch):
    www, url = server
    official_tarball(www / "cifar-10-python.tar.gz")
    monkeypatch.setattr(download, "CIFAR10_URL", f"{url}/cifar-10-python.tar.gz")
    with pytest.raises(cli.DataError, match=f"checksum mismatch \\(expected md5 {download.CIFAR10_MD5}"):
        download.download(tmp_path / "cifar10")
    assert not (tmp_path / "cifar10").exists()


def test_a_root_of_other_files_is_refused_and_an_empty_one_filled(tmp_path):
    source = make_class_folders(tmp_path / "source", train=2, test=1, size=8)
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("a user's file")
    with pytest.raises(cli.DataError) as refused:
        download.download(root, str(source))
    assert str(refused.value) == (f"--root {root}: exists but holds no train/ and test/ folders, with no record of a "
                                  f"download in it (.source); pass --source {root} and a new --root to split its "
                                  "class folders into train/ and test/ there; else choose another --root")
    assert [p.name for p in root.iterdir()] == ["notes.txt"] and leftovers(tmp_path) == []
    (root / "notes.txt").unlink()  # an empty folder made beforehand is filled
    download.download(root, str(source))
    assert sorted(p.name for p in (root / "test").iterdir()) == ["blue", "green", "red"]


@pytest.mark.parametrize("unreadable", ["root", "its parent", "class folders"])
def test_a_folder_that_cannot_be_listed_is_one_line(tmp_path, monkeypatch, unreadable):
    """Before: a traceback for an unreadable --root or the folder it lies in (download.py) and for an unreadable
    split (data.py); only the class folders' own were one line. Root reads any folder: the refusal is simulated."""
    source = make_class_folders(tmp_path / "source", train=2, test=1, size=8)
    root = tmp_path / "mine"
    (root / "x").mkdir(parents=True)
    locked = {"root": root, "its parent": tmp_path, "class folders": source / "train"}[unreadable]
    refuse_listing(monkeypatch, locked)
    with pytest.raises(cli.DataError, match=re.escape(f"{locked}: cannot read this folder (Permission denied); "
                                                      "check its permissions")):
        download.download(root, str(source)) if unreadable != "class folders" else data.load_folder(locked)


def test_a_source_that_is_no_data_set_is_named_and_leaves_nothing(tmp_path):
    odd = make_class_folders(tmp_path / "odd", train=2, test=1, size=8)
    (odd / "train" / "extra").mkdir()
    Image.new("RGB", (8, 8)).save(odd / "train" / "extra" / "0.png")
    (tmp_path / "notes.txt").write_text("no archive")
    (tmp_path / "flat" / "cat").mkdir(parents=True)
    for source, message in ((odd, "train/ and test/ have different class folders (only in train: extra; only in "
                                  "test: none); fix the source"),
                            (tmp_path / "notes.txt", "not a tar or zip archive, or an incomplete one"),
                            (tmp_path / "flat", "no train/ and test/ class folders found (looked two levels down)")):
        with pytest.raises(cli.DataError, match=re.escape(f"{source}: {message}")):
            download.download(tmp_path / "cifar10", str(source))
        assert not (tmp_path / "cifar10").exists() and leftovers(tmp_path) == []


def test_a_root_in_a_read_only_folder_is_one_line(tmp_path, small_filesystem):
    source = make_class_folders(tmp_path / "source", train=2, test=1, size=8)
    read_only = small_filesystem(read_only=True)
    with pytest.raises(cli.DataError, match=f"--root {read_only}/c: cannot write in {read_only} \\(Read-only file "
                       "system\\); choose another --root"):
        download.download(read_only / "c", str(source))


def test_a_root_on_a_completely_full_disk_is_told_to_free_space(tmp_path, small_filesystem):
    """Before: "choose another --root" alone, when the download's lock file could not be written."""
    source = make_class_folders(tmp_path / "source", train=2, test=1, size=8)
    disk = small_filesystem("64k")
    with pytest.raises(OSError), open(disk / "filler", "wb") as filler:
        while True:
            filler.write(bytes(4096))
            filler.flush()
    line = error_line(run("download.py", "--root", disk / "c", "--source", source, check=False))
    assert line == f"download.py: --root {disk}/c: cannot write in {disk} (No space left on device); free space or " \
        "choose another --root"


def test_unreachable_url_is_one_clear_line(tmp_path):
    result = run("download.py", "--root", tmp_path / "c", "--source", "http://127.0.0.1:9/x.tar.gz",
                 check=False)
    assert result.returncode == 1 and "download failed" in error_line(result)
    assert leftovers(tmp_path) == [] and not (tmp_path / "c").exists()


@pytest.mark.parametrize("kind", ["archive.tar.gz", "archive.zip", "folder"])
def test_class_folder_sources(tmp_path, tiny_data, kind):
    source = tiny_data if kind == "folder" else tmp_path / kind
    if kind != "folder":
        class_folder_archive(source, tiny_data)
    root = tmp_path / "cifar10"
    checksum = [] if kind == "folder" else ["--md5", md5(source)]  # a folder has none
    run("download.py", "--root", root, "--source", source, *checksum)
    downloaded = sorted(p.relative_to(root) for p in root.rglob("*.png"))
    expected = sorted(p.relative_to(tiny_data) for p in tiny_data.rglob("*.png"))
    assert downloaded == expected


@pytest.mark.parametrize("kind", ["folder", "archive.zip"])
def test_class_folders_alone_are_split_into_train_and_test_the_same_every_time(tmp_path, kind):
    """One's own photos, <class>/<image> with no train/ and test/: before, refused ("lay it out as train/... and
    test/..."). A fifth of each class's images to test/, or --test-size; an album folder in a class kept; a Mac's zip
    (a top folder beside __MACOSX/) unpacked as it holds; a hidden folder never searched (before: .thumbnails/'s
    folders were split as the classes, without a word)."""
    photos = tmp_path / "src"
    for name, count in (("cat", 12), ("dog", 18)):
        (photos / "photos" / name).mkdir(parents=True)
        made = make_class_folders(tmp_path / "made" / name, classes=(name,), train=count, test=0)
        (made / "train" / name).rename(photos / "photos" / name / "album")
    source = photos / "photos"
    if kind == "archive.zip":
        source = tmp_path / kind
        with zipfile.ZipFile(source, "w") as zf:
            zf.writestr("__MACOSX/photos/cat/._0000.png", b"a Mac's metadata")
            for path in sorted((photos / "photos").rglob("*.png")):
                zf.write(path, path.relative_to(photos).as_posix())
                zf.write(path, f".thumbnails/{path.parent.parent.name}/{path.name}")
    splits = []
    for root in (tmp_path / "one", tmp_path / "two"):
        result = run("download.py", "--root", root, "--source", source)
        assert result.stdout.splitlines()[0] == (f"{source}{'/photos' * (kind != 'folder')}: class folders alone, "
                                                 "split: 6 of their 30 images held out as test/")
        splits.append({split: sorted(p.relative_to(root / split).as_posix() for p in (root / split).rglob("*.png"))
                       for split in ("train", "test")})
    test = splits[0]["test"]
    assert splits[0] == splits[1] and sum(p.startswith("cat/album/") for p in test) == 2 and len(test) == 6
    assert sorted(test + splits[0]["train"]) == sorted(p.relative_to(photos / "photos").as_posix()
                                                       for p in (photos / "photos").rglob("*.png"))  # copied, kept
    run("download.py", "--root", tmp_path / "three", "--source", source, "--test-size", "10")
    assert len(list((tmp_path / "three" / "test" / "dog").rglob("*.png"))) == 6
    # Another --test-size, of a root made, or of a source already split: before, "nothing to do" or taken as it was
    result = run("download.py", "--root", tmp_path / "three", "--source", source, "--test-size", "9", check=False)
    assert error_line(result) == (f"download.py: --root {tmp_path / 'three'}: holds 10 test images, not --test-size "
                                  "9; pass --test-size 10 (or none), or choose another --root for a new split")
    result = run("download.py", "--root", tmp_path / "four", "--source", tmp_path / "one", "--test-size", "9",
                 check=False)
    assert error_line(result) == (f"download.py: --test-size 9: {tmp_path / 'one'} holds train/ and test/ already "
                                  "(6 test images), taken as they are; drop --test-size")
    assert "nothing to do" in run("download.py", "--root", tmp_path / "three", "--source", source, "--test-size",
                                  "10").stdout and not (tmp_path / "four").exists()


def test_a_hand_made_root_of_another_test_size_is_never_advised_away(tmp_path):
    """Before: "remove the folder to split its source again" of a ROOT made by hand (no .source: one's own train/ and
    test/, maybe their only copy), which has no source to split again."""
    root = make_class_folders(tmp_path / "mine", classes=("a", "b"), train=3, test=2)
    result = run("download.py", "--root", root, "--test-size", "3", check=False)
    assert error_line(result) == (f"download.py: --root {root}: holds 4 test images, not --test-size 3; pass "
                                  "--test-size 4 (or none), or choose another --root for a new split")
    assert "nothing to do" in run("download.py", "--root", root, "--test-size", "4").stdout


def test_a_test_size_of_the_official_cifar10_is_refused_before_it_is_downloaded(tmp_path, monkeypatch):
    """Before: refused only once its 163 MB were downloaded and its 60,000 images converted (`invoke all
    --test-size N` without --source): it holds train/ and test/ already."""
    monkeypatch.setattr(download, "CIFAR10_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")  # nothing listens
    with pytest.raises(cli.DataError) as refused:
        download.download(tmp_path / "cifar10", test_size=5)
    assert str(refused.value) == ("--test-size 5: the official CIFAR-10 holds train/ and test/ already (10,000 test "
                                  "images), taken as they are; drop --test-size, or pass --source a folder or archive "
                                  "of class folders alone to split")
    assert leftovers(tmp_path) == [] and not (tmp_path / "cifar10").exists()


def test_an_image_added_to_class_folders_moves_others_between_splits_only_at_the_edge(tmp_path):
    """Before, a seeded shuffle: one photo more in cat/ redrew dog/'s test images too, and a fine-tune from a checkpoint
    of the first split was tested on images it had trained on. Now those whose names hash lowest: cat's test images
    stay test images (its share grows by one), dog's share shrinks by one from its own."""
    photos = make_class_folders(tmp_path / "made", classes=("cat", "dog"), train=18, test=0) / "train"
    for extra in range(12, 18):
        (photos / "cat" / f"{extra:04d}.png").unlink()  # 12 cats, 18 dogs: 2 and 4 of 6 held out
    tests = []
    for root in ("before", "after"):
        if root == "after":
            (photos / "dog" / "0000.png").rename(photos / "cat" / "new.png")  # 13 and 17: 3 and 3 held out
        run("download.py", "--root", tmp_path / root, "--source", photos, "--test-size", "6")
        tests.append({name: {p.name for p in (tmp_path / root / "test" / name).iterdir()} for name in ("cat", "dog")})
    assert tests[0]["cat"] < tests[1]["cat"] and tests[1]["dog"] < tests[0]["dog"] and len(tests[1]["dog"]) == 3
    # the same name on Windows ('\\') and macOS (NFD) hashes as here: the same split of the same files everywhere
    assert download.name_hash(PureWindowsPath("caf\u00e9\\1.png")) == download.name_hash(Path("cafe\u0301/1.png"))


def test_copies_of_a_photo_in_class_folders_alone_go_to_one_split(tmp_path, capsys):
    """Before: a photo saved twice (`0001.png`, `copy of 0001.png`) could land in train/ and test/ alike, a test image
    then trained on: test accuracy flattered. Byte-identical files of a class now go to one split, whole; --test-size
    is still met, or it is one line (as a class of copies alone)."""
    photos = make_class_folders(tmp_path / "made", classes=("cat", "dog"), train=10, test=0) / "train"
    for path in sorted(photos.rglob("*.png")):
        shutil.copy(path, path.with_name(f"copy of {path.name}"))
    download.download(tmp_path / "root", str(photos), test_size=8)
    assert capsys.readouterr().out.startswith(f"{photos}: class folders alone, split: 8 of their 40 images held out")
    for name in ("cat", "dog"):
        test, train = ([p.name.removeprefix("copy of ") for p in (tmp_path / "root" / split / name).iterdir()]
                       for split in ("test", "train"))
        assert len(test) == 4 and len(set(test)) == 2 and not set(test) & set(train)
    with pytest.raises(cli.DataError) as refused:  # 3 of each class's 10 pairs: no whole pairs make it
        download.download(tmp_path / "odd", str(photos), test_size=6)
    assert str(refused.value) == (f"{photos}/cat: its share of test/ (3) cannot be held out in whole groups of copies "
                                  "(byte for byte; held out apart, a copy would be trained on too); pass another "
                                  "--test-size, or remove the copies")
    for path in (photos / "dog").glob("*0[1-9]*.png"):
        shutil.copy(photos / "dog" / "0000.png", path)
    with pytest.raises(cli.DataError, match=f"^{photos}/dog: its share of test/ \\(4\\) cannot be held out"):
        download.download(tmp_path / "again", str(photos))
    assert not (tmp_path / "odd").exists() and not (tmp_path / "again").exists()


def test_links_in_an_archive_of_class_folders_alone_are_split_as_what_they_point_to(tmp_path):
    """Before: moved as links, a link in test/ to an image moved to train/ (or the reverse) pointed to nothing, the
    image left out without a word ("36 images, 7 held out" then "28 training and 6 test"); a linked class folder
    failed, naming the temporary folder."""
    photos = make_class_folders(tmp_path / "made", classes=("cat", "dog"), train=5, test=0) / "train"
    for i in range(5):
        (photos / "dog" / f"cat{i}.png").symlink_to(f"../cat/{i:04d}.png")
    (photos / "kitty").symlink_to("cat")
    with tarfile.open(tmp_path / "photos.tar", "w") as tar:
        tar.add(photos, "photos")
    result = run("download.py", "--root", tmp_path / "r", "--source", tmp_path / "photos.tar", "--test-size", "6")
    assert result.stdout.splitlines()[1] == f"{tmp_path / 'r'}: 14 training and 6 test images in 3 classes"
    assert not [p for p in (tmp_path / "r").rglob("*") if p.is_symlink()]


def test_links_in_an_archive_of_train_and_test_are_taken_as_what_they_point_to(tmp_path):
    """Before: train/ and test/ were moved out of the unpacked archive whole, links and all: one to an image beside
    them pointed to nothing, its image left out without a word ("5 training" of 6), a broken link in ROOT."""
    ds = make_class_folders(tmp_path / "made" / "ds", classes=("a", "b"), train=3, test=2)
    (tmp_path / "made" / "extra").mkdir()
    (ds / "train" / "a" / "0000.png").rename(tmp_path / "made" / "extra" / "0000.png")
    (ds / "train" / "a" / "0000.png").symlink_to("../../../extra/0000.png")
    (ds / "test" / "b" / "twin.png").symlink_to("../../train/b/0001.png")  # its target moved: copied first
    with tarfile.open(tmp_path / "ds.tar", "w") as tar:
        tar.add(tmp_path / "made", "made")
    result = run("download.py", "--root", tmp_path / "r", "--source", tmp_path / "ds.tar")
    assert result.stdout.splitlines()[0] == f"{tmp_path / 'r'}: 6 training and 5 test images in 2 classes"
    assert not [p for p in (tmp_path / "r").rglob("*") if p.is_symlink()]


def test_a_gif_left_out_of_an_archive_is_named_in_the_archive_not_in_the_temporary_folder(tmp_path):
    """Before: "such as .r.partial-x1y2/extract/photos/a/x.gif", a folder gone when the line is read."""
    photos = make_class_folders(tmp_path / "made", classes=("a", "b"), train=3, test=0) / "train"
    Image.new("RGB", (8, 8)).save(photos / "a" / "x.gif")
    with tarfile.open(tmp_path / "photos.tar", "w") as tar:
        tar.add(photos, "photos")
    result = run("download.py", "--root", tmp_path / "r", "--source", tmp_path / "photos.tar")
    assert f"1 image file(s) left out, of types not taken from folders (.gif; such as {tmp_path}/photos.tar/photos/a/" \
        "x.gif)" in result.stderr


def test_a_folder_named_with_a_trailing_slash_names_its_class_folders_with_one(tmp_path):
    """`--source photos/`, as a shell completes it: before, "photos//a/x.gif" in the warning and the errors."""
    photos = make_class_folders(tmp_path / "made", classes=("a", "b"), train=3, test=0) / "train"
    Image.new("RGB", (8, 8)).save(photos / "a" / "x.gif")
    result = run("download.py", "--root", tmp_path / "r", "--source", "train/", cwd=photos.parent)
    assert result.stdout.splitlines()[0] == "train: class folders alone, split: 2 of their 6 images held out as test/"
    assert "(.gif; such as train/a/x.gif)" in result.stderr


def test_class_folders_too_small_to_split_or_train_and_val_are_one_line(tmp_path):
    """Before, train/ beside val/ of class folders: val/ split alone, train/ dropped without a word; train/ alone in
    an archive: "no train/ and test/ class folders found" (val/ alone was split). A --test-size below the classes
    said "add images to it" of a class of many; the default, a fifth, did so with fewer than five images a class."""
    source = make_class_folders(tmp_path / "src", classes=("a", "b"), train=3, test=0) / "train"
    for empty in ("a", "b", ""):
        (source.parent / "test" / empty).rmdir()
    shutil.copytree(source, source.parent / "val")  # train/ and val/: never split as two classes named so, nor one
    result = run("download.py", "--root", tmp_path / "r", "--source", source.parent, check=False)
    assert error_line(result) == (f"download.py: {source.parent}: holds train/ and val/: a split other than train/ "
                                  "and test/ (or a class named so); lay it out as train/<class>/ and test/<class>/ "
                                  "(a val/ may be renamed test/), or as <class>/ folders alone to split (a class "
                                  "named so renamed, e.g. train/ to trains/)")
    shutil.rmtree(source.parent / "val")
    with tarfile.open(tmp_path / "train.tar", "w") as tar:  # train/ alone: class folders to split, as val/ alone
        tar.add(source, "ds/train")
    result = run("download.py", "--root", tmp_path / "t", "--source", tmp_path / "train.tar")  # 2: one a class
    assert result.stdout.startswith(f"{tmp_path / 'train.tar'}/ds/train: class folders alone, split: 2 of their 6 ")
    # A --root inside the source: before, made there; a later run from the source took its train/ and test/
    result = run("download.py", "--root", source / "split", "--source", source, check=False)
    assert error_line(result) == (f"download.py: --root {source / 'split'}: inside --source {source}, among the "
                                  "images it is made from; choose a --root outside it")
    assert sorted(p.name for p in source.iterdir()) == ["a", "b"]
    result = run("download.py", "--root", tmp_path / "r", "--source", source, "--test-size", "5", check=False)
    assert error_line(result) == f"download.py: {source}/a: 3 images, none left for train/; pass a smaller --test-size"
    result = run("download.py", "--root", tmp_path / "r", "--source", source, "--test-size", "1", check=False)
    assert error_line(result) == (f"download.py: {source}/b: 3 images, none left for test/; pass a --test-size of at "
                                  "least 2, one image of each class")
    (source / "b" / "0001.png").unlink()
    (source / "b" / "0002.png").unlink()
    result = run("download.py", "--root", tmp_path / "r", "--source", source, check=False)
    assert error_line(result) == f"download.py: {source}/b: 1 image, none left for test/; add images to it"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "t", "train.tar"]  # nothing written, nor left


def test_class_folders_alone_with_a_class_named_as_a_split_are_told_to_rename_it(tmp_path):
    """CIFAR-100 has a class named train, one's photos may (trains), or test: refused as a split's folder beside others
    (a split's train/ beside a folder of other images looks the same), the advice named layouts alone, no way out."""
    photos = make_class_folders(tmp_path / "made", classes=("bus", "car", "train"), train=5, test=0) / "train"
    result = run("download.py", "--root", tmp_path / "r", "--source", photos, check=False)
    assert error_line(result) == (f"download.py: {photos}: holds train/ beside other folders: a split other than "
                                  "train/ and test/ (or a class named so); lay it out as train/<class>/ and "
                                  "test/<class>/ (a val/ may be renamed test/), or as <class>/ folders alone to split "
                                  "(a class named so renamed, e.g. train/ to trains/)")
    (photos / "train").rename(photos / "trains")
    assert "3 classes" in run("download.py", "--root", tmp_path / "r", "--source", photos).stdout


def test_a_root_from_another_source_is_refused_and_its_own_source_named(tmp_path, tiny_data):
    """Before: `--source other` on a root made from another source said "nothing to do" and ignored it. A folder's
    images added since are not taken: said (before, "nothing to do" alone, to one who had added photos)."""
    root, other = tmp_path / "cifar10", make_class_folders(tmp_path / "other", classes=("a", "b"), train=2, test=1)
    run("download.py", "--root", root, "--source", tiny_data)
    for source in ([], ["--source", tiny_data], ["--source", os.path.relpath(tiny_data, tmp_path)]):
        result = run("download.py", "--root", "cifar10", *source, cwd=tmp_path)
        assert result.stdout == (f"cifar10 already holds train/ and test/ (made from {tiny_data}; what changed there "
                                 "since is not taken: remove cifar10 to take it); nothing to do\n")
    result = run("download.py", "--root", root, "--source", other, check=False)
    assert error_line(result) == (f"download.py: --root {root}: holds the data set made from {tiny_data}, not from "
                                  f"--source {other}; remove the folder to download this one into it, or choose "
                                  "another --root")
    assert sorted(p.name for p in (root / "train").iterdir()) == ["blue", "green", "red"]


def evil_tar(path: Path, kind: str) -> None:
    with tarfile.open(path, "w:gz") as tar:
        name = {"dotdot": "cifar10/../../evil.txt", "absolute": "/tmp/evil-absolute.txt"}.get(kind, "cifar10/link")
        info = tarfile.TarInfo(name)
        if kind in ("symlink", "hardlink"):
            info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
            info.linkname = "../../../etc/passwd"
            tar.addfile(info)
        else:
            payload = b"escaped"
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink", "zip"])
def test_archive_members_escaping_the_root_are_refused(tmp_path, kind):
    work = tmp_path / "work"
    work.mkdir()
    archive = work / ("evil.zip" if kind == "zip" else "evil.tar.gz")
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr("../../evil.txt", "escaped")
    else:
        evil_tar(archive, kind)
    root = work / "deep" / "cifar10"
    result = run("download.py", "--root", root, "--source", archive, check=False)
    advice = "refusing to unpack it; use the official archive or an archive or folder of class folders"
    assert result.returncode == 1 and error_line(result).endswith(f"points outside the archive; {advice}")
    assert not root.exists() and leftovers(root.parent) == []
    assert not (tmp_path / "evil.txt").exists() and not (work / "evil.txt").exists()
    assert not Path("/tmp/evil-absolute.txt").exists()


@pytest.mark.parametrize("kind", ["folder then file", "file then below it", "zip"])
def test_archive_members_naming_a_folder_and_a_file_blame_the_archive(tmp_path, tiny_data, kind):
    """Before: "--root ...: cannot write (Is a directory); free space or choose another --root", as for a full disk.
    The member's name is an archive's: shown escaped, never a terminal's control sequence."""
    archive, clash = tmp_path / ("a.zip" if kind == "zip" else "a.tar"), "train/red/0000\x1b[31m.png"
    members = [(f"{split}/{p.parent.name}/{p.name}", p) for split in ("train", "test")
               for p in sorted((tiny_data / split).glob("*/*.png"))]
    members.append((clash, members[0][1]))
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for name, path in members + [(f"{clash}/x.png", members[0][1])]:
                zf.write(path, name)
    else:
        with tarfile.open(archive, "w") as tar:
            if kind == "folder then file":
                info = tarfile.TarInfo(clash)
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            for name, path in members + [(f"{clash}/x.png", members[0][1])] * (kind == "file then below it"):
                tar.add(path, name)
    result = run("download.py", "--root", tmp_path / "cifar10", "--source", archive, check=False)
    below = "/x.png" * (kind != "folder then file")
    assert error_line(result) == (f"download.py: {archive}: damaged or incomplete archive "
                                  f"({'Not a directory' if below else 'Is a directory'}: {cli.shown(clash)}{below}); "
                                  "download it again")
    assert not (tmp_path / "cifar10").exists() and leftovers(tmp_path) == []


def test_folder_loader_follows_imagefolder_conventions(tmp_path):
    root = make_class_folders(tmp_path / "d", classes=("b_second", "a_first"), train=3, test=1)
    (root / "train" / "a_first" / ".hidden.png").write_bytes(b"not an image")
    (root / "train" / "a_first" / "notes.txt").write_text("ignored")
    (root / "train" / ".hidden_class").mkdir()
    (root / "train" / "a_first" / ".ipynb_checkpoints").mkdir()  # before: its images were trained on
    Image.new("RGB", (8, 8)).save(root / "train" / "a_first" / ".ipynb_checkpoints" / "copy.png")
    Image.new("RGB", (64, 48), "white").save(root / "train" / "a_first" / "big.jpg")
    images = data.load_folder(root / "train")
    assert images.classes == ["a_first", "b_second"]
    assert images.images.shape == (7, 3, 32, 32) and images.images.dtype == torch.uint8
    assert images.labels.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert (images.images[3] >= 250).all()  # big.jpg, after 0000-0002.png, resized to the stored 32 px


def test_a_linked_sub_folder_is_followed_and_a_link_loop_is_not(tmp_path):
    root = make_class_folders(tmp_path / "d", train=2, test=1)
    elsewhere = make_class_folders(tmp_path / "elsewhere", classes=("red",), train=3, test=1) / "train" / "red"
    (root / "train" / "red" / "more").symlink_to(elsewhere)  # ImageFolder follows it
    (root / "train" / "red" / "loop").symlink_to(root / "train")  # a loop back up the tree
    (elsewhere / "back").symlink_to(root / "train" / "red")  # a loop through the linked folder
    classes, samples = data.scan_class_folders(root / "train")
    red = [path for path, label in samples if label == classes.index("red")]
    assert len(samples) == 2 * 3 + 3 and len(red) == 5
    assert root / "train" / "red" / "more" / "0002.png" in red
    deep = root / "train" / "green" / "/".join("d" * 300)
    deep.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(deep / "deep.png")
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(200)  # a tree deeper than the recursion limit: walked, not recursed
    try:
        assert deep / "deep.png" in data.image_files(root / "train" / "green")[0]
    finally:
        sys.setrecursionlimit(limit)
    (root / "train" / "all").symlink_to(".")  # a class folder that is the split folder: a loop, so no images
    with pytest.raises(cli.DataError, match="train/all: class folder has no images"):
        data.scan_class_folders(root / "train")


def test_images_of_types_not_taken_from_class_folders_are_said_to_be_left_out(tmp_path, capsys):
    """A .gif or .jfif photo (Pillow reads both) or an iPhone's .heic is left out of its class as ImageFolder leaves
    it; before, unsaid.
    Files of no image type (notes, Thumbs.db, HDF5 data, video) and hidden ones are left out quietly."""
    root = make_class_folders(tmp_path / "d", train=2, test=1)
    (root / "train" / "red" / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(root / "train" / "red" / "sub" / "party.gif")
    (root / "train" / "red" / "IMG_0001.HEIC").write_bytes(b"x")  # an iPhone's: Pillow reads none without a plugin
    Image.new("RGB", (8, 8)).save(root / "train" / "green" / "scan.jfif", "JPEG")
    (root / "train" / "green" / "album").mkdir()  # the first named is the first in order, not the first found
    Image.new("RGB", (8, 8)).save(root / "train" / "green" / "album" / "old.gif")
    for name in ("notes.txt", "Thumbs.db", ".hidden.gif", "data.h5", "clip.mpg"):  # Pillow's stubs, video: no images
        (root / "train" / "blue" / name).write_bytes(b"x")
    classes, samples = data.scan_class_folders(root / "train")
    assert len(samples) == 2 * len(classes)
    assert capsys.readouterr().err == (
        f"warning: {root}/train: 4 image file(s) left out, of types not taken from folders (.gif, .heic, .jfif; such "
        f"as {root}/train/green/album/old.gif): convert them to one of .jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, "
        ".tiff, .webp to use them\n")
    data.scan_class_folders(root / "test")
    assert capsys.readouterr().err == ""


def test_a_folder_named_relatively_or_absolutely_or_moved_uses_its_cache(tmp_path, monkeypatch):
    root = make_class_folders(tmp_path / "d", train=3, test=1)
    first = data.load_folder(root / "train")
    monkeypatch.setattr(data, "decode_all", lambda *a: pytest.fail("decoded despite a valid cache"))
    monkeypatch.chdir(tmp_path)
    assert torch.equal(data.load_folder("d/train").images, first.images)
    root.rename(tmp_path / "moved")  # the cache, in .cache/ beside train/, moves with it
    assert data.load_folder(tmp_path / "moved" / "train").fingerprint == first.fingerprint


def test_a_fingerprint_is_the_one_runs_from_before_recorded(tmp_path):
    """The names relative to the split folder (nested ones too), labels, sizes and mtimes hash as they always did: a
    resume compares the fingerprint with its run's, so another spelling of the same files would refuse every run."""
    for i, name in enumerate(["a/1.png", "a/sub/deeper/2.png", "b/an image.png"]):
        path = tmp_path / "train" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * (i + 3))
        os.utime(path, ns=(0, 10**18 + i))
    classes, samples = data.scan_class_folders(tmp_path / "train")
    recorded = "8d83b9ef06c664056b30764b6dea7e58efa722f5f347ad3b9bd51d8aa7e8b8d8"  # by the code at bcc1c95
    assert data.fingerprint(samples, classes, 32, tmp_path / "train")[0] == recorded


def test_a_url_as_the_data_folder_says_to_download_it_first(tmp_path):
    result = run("pretrain.py", "--data-dir", "https://example.com/data.tar.gz", "--out", tmp_path / "p.pt",
                 "--device", "cpu", check=False, cwd=tmp_path)
    assert error_line(result) == ("pretrain.py: https:/example.com/data.tar.gz: a URL, not a folder; pass --data-dir "
                                  "FOLDER of train/<class>/ and test/<class>/ folders (python download.py --source "
                                  "URL|ARCHIVE|FOLDER --root FOLDER makes one, splitting <class>/ folders alone)")


def test_empty_or_missing_folders_are_clear_errors_that_name_no_flag_of_ours(tmp_path):
    """data.py is also a library (see data.Loader): its messages name the path and the problem, no flag."""
    missing, empty = tmp_path / "missing", tmp_path / "empty"
    (tmp_path / "train" / "cat").mkdir(parents=True)
    empty.mkdir()
    image = tmp_path / "cat.png"  # an image given where its folder's parent is meant
    image.write_bytes(b"")
    for call, message in [(lambda: data.load_folder(missing), f"{missing}: no such folder; expected a folder of "
                           "class folders"),
                          (lambda: data.Loader(image, 2, 64), f"{image}: a file, not a folder; expected a folder of "
                           "class folders"),  # before: "no such folder", of a file that is there
                          (lambda: data.load_folder(empty), f"{empty}: no class folders inside; expected "
                           f"{empty}/<class>/<image> files"),
                          (lambda: data.load_folder(tmp_path / "train"), "cat: class folder has no images"),
                          (lambda: data.load_dataset(tmp_path), f"{tmp_path}: no test/ folder; a data folder holds "
                           "train/<class>/ and test/<class>/"),
                          (lambda: data.load_dataset("https://example.com/d"), "https:/example.com/d: a URL, not a "
                           "folder; download it into a folder first")]:
        with pytest.raises(cli.DataError) as error:
            call()
        assert message in str(error.value) and "--" not in str(error.value) and ".py" not in str(error.value)


def test_cache_metadata_that_cannot_be_written_is_a_warning_and_the_cache_untrusted(tmp_path, monkeypatch, capsys):
    """The images fit (their space is allocated first), the small metadata file then fails: a warning, not an
    OSError traceback; without the metadata the next run decodes again."""
    root = make_class_folders(tmp_path / "d", train=3, test=1)

    def full(path, write):
        raise OSError(28, "No space left on device", str(path))
    monkeypatch.setattr(cli, "write_atomically", full)
    assert data.load_folder(root / "train").images.shape == (9, 3, 32, 32)
    assert (f"warning: cannot write the image cache {root}/.cache/train.json (No space left on device); decoding "
            "every run") in capsys.readouterr().err
    assert not (root / ".cache" / "train.json").exists()


def test_a_median_side_the_sample_missed_is_decoded_again_at_the_right_one(tmp_path):
    """The side is guessed from every third image here (a sample of at most 64): those are 8 px, the other two
    thirds 12 px, so the median of all the images' sides disagrees with the guess and decides."""
    for i in range(192):
        folder = tmp_path / "train" / "ab"[i // 96]
        folder.mkdir(parents=True, exist_ok=True)
        side = 8 if i % 3 == 0 else 12
        Image.new("RGB", (side, side), "red").save(folder / f"{i % 96:03d}.png")
    assert data.load_folder(tmp_path / "train", cache=False).images.shape == (192, 3, 12, 12)


def test_photos_of_all_sizes_are_stored_at_their_median_side_not_at_a_few_thumbnails(tmp_path, monkeypatch):
    """Photos of sides no two share, and three thumbnails of one size: the most common side would be 8 px. A cache
    built by the code before (at that side, its key naming no rule of choosing it) is built again; the fingerprint a
    resume compares stays, and a cache of a size given, which no rule chose, is kept."""
    sides = [8, 8, 8, 20, 22, 24, 26, 28, 30]
    for i, side in enumerate(sides):
        folder = tmp_path / "train" / "ab"[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (side + 5, side), "red").save(folder / f"{i}.png")
    assert data.load_folder(tmp_path / "train", cache=False).stored_size == 22
    for i, side in enumerate([260, 300, 900]):  # larger photos: at most 256 px, enough for 224 crops
        (tmp_path / "large" / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (side, side), "red").save(tmp_path / "large" / "ab"[i % 2] / f"{i}.png")
    assert data.load_folder(tmp_path / "large", cache=False).stored_size == 256
    with monkeypatch.context() as old:
        old.setattr(data, "typical_side", lambda sides: max(set(sides), key=sides.count))
        old.setattr(data, "SIDE_RULE", "most common")
        before = data.load_folder(tmp_path / "train")
        assert before.stored_size == 8
        data.load_folder(tmp_path / "large", size=16)
    after = data.load_folder(tmp_path / "train")
    assert after.stored_size == 22 and after.fingerprint == before.fingerprint
    monkeypatch.setattr(data, "decode_all", lambda *a: pytest.fail("a given size's cache built again for a new rule"))
    assert data.load_folder(tmp_path / "large", size=16).stored_size == 16


def test_cache_is_used_and_rebuilt_when_the_folder_changes(tmp_path, monkeypatch):
    root = make_class_folders(tmp_path / "d", train=3, test=1)
    first = data.load_folder(root / "train")
    assert (root / ".cache" / "train.u8").is_file() and (root / ".cache" / "train.json").is_file()
    calls = []
    monkeypatch.setattr(data, "decode_all", lambda *a: calls.append(a) or pytest.fail("decoded despite a valid cache"))
    assert torch.equal(data.load_folder(root / "train").images, first.images)
    monkeypatch.undo()
    Image.new("RGB", (32, 32), "black").save(root / "train" / "red" / "0000.png")  # same name, new content
    changed = data.load_folder(root / "train")
    first_red = changed.classes.index("red") * 3
    assert changed.images[first_red].sum() == 0 and first.images[first_red].sum() > 0
    Image.new("RGB", (32, 32), "black").save(root / "train" / "red" / "extra.png")
    assert len(data.load_folder(root / "train").labels) == len(first.labels) + 1
    assert data.load_folder(root / "train", size=16).images.shape[-1] == 16  # another stored size: not this cache


class CreationTimeKept:
    """A file's stat where st_ctime is its creation time (Windows) and the file system kept the old one for a file
    renamed over it (NTFS's tunnelling): the inode alone tells the files apart."""

    def __init__(self, real: os.stat_result, ctime_ns: int) -> None:
        self.real, self.st_ctime_ns, self.st_ctime = real, ctime_ns, ctime_ns / 1e9

    def __getattr__(self, name: str):
        return getattr(self.real, name)


@pytest.mark.parametrize("how", ["renamed over it", "written into it", "renamed over it, its ctime kept"])
def test_an_image_replaced_by_one_of_the_same_size_and_mtime_rebuilds_the_cache(tmp_path, monkeypatch, how):
    """Before: the key saw only names, sizes and mtimes, and the replaced image's old pixels were used."""
    for name, colour in (("a", "red"), ("b", "blue")):
        (tmp_path / "train" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8), colour).save(tmp_path / "train" / name / "0.bmp")  # a BMP's size is its shape's
    image, replacement = tmp_path / "train" / "a" / "0.bmp", tmp_path / "black.bmp"
    assert data.load_folder(tmp_path / "train").images[0].sum() > 0
    before = image.stat()
    Image.new("RGB", (8, 8), "black").save(replacement)
    if how.startswith("renamed over it"):
        os.replace(replacement, image)
    while image.stat().st_ctime_ns == before.st_ctime_ns:  # in a later tick of the file system's clock, as in life
        image.write_bytes(replacement.read_bytes())
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert image.stat().st_size == before.st_size and image.stat().st_mtime_ns == before.st_mtime_ns
    if how.endswith("its ctime kept"):
        real_stat = Path.stat
        monkeypatch.setattr(Path, "stat", lambda path, **kwargs: CreationTimeKept(
            real_stat(path, **kwargs), before.st_ctime_ns) if path == image else real_stat(path, **kwargs))
    assert data.load_folder(tmp_path / "train").images[0].sum() == 0


@pytest.mark.parametrize("damage", ["zeroed", "one byte changed", "truncated"])
def test_a_damaged_cache_is_rebuilt_with_one_warning(tmp_path, capsys, damage):
    """Before: a zeroed train.u8 (or one byte changed) of the right length was used silently."""
    root = make_class_folders(tmp_path / "d", train=3, test=1)
    pixels = data.load_folder(root / "train").images.clone()
    cache = root / ".cache" / "train.u8"
    with open(cache, "r+b") as f:  # in place, as a disk or a stray program damages it
        if damage == "zeroed":
            f.write(bytes(len(pixels.flatten())))
        elif damage == "one byte changed":
            f.seek(100)
            f.write(bytes([255 - pixels.flatten()[100].item()]))
        else:
            f.truncate(1000)
    capsys.readouterr()
    assert torch.equal(data.load_folder(root / "train").images, pixels)
    assert capsys.readouterr().err == (f"warning: {cache}: the image cache is damaged (not the length or the pixels "
                                       "it was built with); decoding the images again\n")
    assert torch.equal(data.load_folder(root / "train").images, pixels) and capsys.readouterr().err == ""


def test_stratified_split_is_seeded_disjoint_and_proportional():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    picked, rest = data.stratified_split(labels, 10, seed=3)
    assert torch.bincount(labels[picked]).tolist() == [5, 3, 2]
    assert sorted(torch.cat([picked, rest]).tolist()) == list(range(100))
    assert torch.equal(picked, data.stratified_split(labels, 10, seed=3)[0])
    assert not torch.equal(picked, data.stratified_split(labels, 10, seed=4)[0])


def test_a_stratified_split_gives_a_rare_class_one_image_too():
    """Before: a class of 3 among 128 images had no validation image in the default split of 12 (largest remainders
    gave it none), though --val-size's help says at least one per class."""
    labels = torch.tensor([0] * 70 + [1] * 30 + [2] * 25 + [3] * 3 + [4])
    picked, _ = data.stratified_split(labels, 12, seed=0)
    assert torch.bincount(labels[picked], minlength=5).tolist() == [6, 3, 2, 1, 0]  # 4: its one image trains
    assert data.stratified_quota(torch.tensor([70, 30, 25, 3]), 3).tolist() == [1, 1, 1, 0]  # none left to give


def test_eval_batch_is_torchvisions_resize_and_centre_crop():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    reference = T.Compose([
        T.ToDtype(torch.float32, scale=True),
        T.Resize(int(64 * 256 / 224), antialias=False),
        T.CenterCrop(64),
        T.Normalize(data.MEAN, data.STD),
    ])
    assert torch.allclose(data.eval_batch(images, 64), reference(images), atol=1e-4)


def test_eval_batch_gives_each_image_the_numbers_of_its_own_box():
    """Its one centre box's weights, made once and broadcast, are bit for bit those of a box for each image, in a batch
    or alone: a split's evaluation and predict.py's single image (and the exported program) give the same logits."""
    generator = torch.Generator().manual_seed(0)
    for stored, size in ((32, 64), (256, 224), (96, 32)):
        images = torch.randint(0, 256, (5, 3, stored, stored), dtype=torch.uint8, generator=generator)
        resized = int(size * data.EVAL_RESIZE)
        offset = round((resized - size) / 2)
        box = torch.tensor([offset, offset, offset + size, offset + size], dtype=torch.float32) * stored / resized
        each_its_own = data.normalize(data.crop_resize(images, box.expand(len(images), 4), size))
        assert torch.equal(data.eval_batch(images, size), each_its_own)
        assert torch.equal(torch.cat([data.eval_batch(image[None], size) for image in images]), each_its_own)


def test_train_batch_follows_random_resized_crop_and_flip():
    n, side = 4000, 32
    generator = torch.Generator().manual_seed(0)
    boxes = data.random_resized_boxes(n, side, generator, torch.device("cpu"))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= side).all() and (w >= 1).all() and (h >= 1).all()
    torch.manual_seed(0)
    reference = torch.tensor([T.RandomResizedCrop.get_params(torch.empty(3, side, side), [0.08, 1.0], [3 / 4, 4 / 3])
                              for _ in range(n)], dtype=torch.float32)
    ours_area, ref_area = (w * h / side ** 2), reference[:, 2] * reference[:, 3] / side ** 2
    assert abs(ours_area.mean() - ref_area.mean()) < 0.02
    assert abs((w / h).log().mean() - (reference[:, 3] / reference[:, 2]).log().mean()) < 0.03
    assert abs((w == side).float().mean() - (reference[:, 3] == side).float().mean()) < 0.03

    image = torch.arange(32, dtype=torch.uint8).repeat(1, 3, 32, 1)  # brightness grows left to right
    batch = data.train_batch(image.expand(400, -1, -1, -1), 64, torch.Generator().manual_seed(1))
    assert batch.shape == (400, 3, 64, 64) and batch.dtype == torch.float32
    flipped = (batch[:, 0, 32, 0] > batch[:, 0, 32, -1]).float().mean()
    assert 0.4 < flipped < 0.6
    again = data.train_batch(image.expand(400, -1, -1, -1), 64, torch.Generator().manual_seed(1))
    assert torch.equal(batch, again)


def test_padded_crop_shifts_within_an_eighth_and_pads_black():
    """RandomCrop(padding=side/8) as a crop of the image padded with black. Before: a shift of s showed s - 1 black
    rows, then the edge row again (roi_align reads the edge for half a pixel beyond it), none at a shift of 1."""
    boxes = data.random_shift_boxes(2000, 32, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert set(boxes[:, 0].unique().tolist()) == set(range(-4, 5)) and ((boxes[:, 2:] - boxes[:, :2]) == 32).all()
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    for size in (32, 224):
        padded = data.crop_resize(F.pad(images, (4,) * 4), boxes[:16] + 4, size)
        assert torch.allclose(data.crop_resize(images, boxes[:16], size, black_outside=True), padded, atol=1e-2)
    white = torch.full((2000, 3, 32, 32), 255, dtype=torch.uint8)
    batch = data.train_batch(white, 32, torch.Generator().manual_seed(0), augmentation="crop")
    black = data.normalize(torch.zeros(1, 3, 1, 1))
    shifted = (batch[:, :, :, 0] - black[:, :, :, 0]).abs().amax((1, 2)) < 1e-4  # the left column lies in the padding
    assert 0.4 < shifted.float().mean() < 0.49  # shifts -4 to -1 (and their mirror images), 4 of 9


def test_cutout_sets_one_clipped_square_per_image_to_the_mean_colour():
    white = torch.full((500, 3, 32, 32), 255, dtype=torch.uint8)  # nothing else is 0 after normalisation
    plain = data.train_batch(white, 64, torch.Generator().manual_seed(0))
    assert not (plain == 0).any()
    batch = data.train_batch(white, 64, torch.Generator().manual_seed(0), cutout=0.5)
    hole = (batch == 0).all(1)
    assert torch.equal(hole, (batch == 0).any(1))  # every channel, or none
    rows, columns = hole.any(2).sum(1), hole.any(1).sum(1)
    assert torch.equal(hole.sum((1, 2)), rows * columns)  # a rectangle (the rows and columns it covers are contiguous:)
    assert ((hole.any(2).int().diff(dim=1) != 0).sum(1) <= 2).all()
    assert ((hole.any(1).int().diff(dim=1) != 0).sum(1) <= 2).all()
    assert rows.max() == columns.max() == 32  # 32 px,
    assert rows.min() >= 16 and columns.min() >= 16  # clipped by at most half
    # a centre anywhere in the image: ~27.75 px covered per side on average, ~770 of 1,024 px
    assert 700 < hole.sum((1, 2)).float().mean() < 840
    assert torch.equal(torch.where(hole[:, None], plain, batch), plain)  # the same crop and flip draws, then the hole


def test_crop_resize_is_roi_align_shrinking_enlarging_and_beyond_the_edges():
    """torchvision's roi_align (aligned, adaptive sampling), which the crop was: the same samples and weights."""
    for side, size in ((32, 64), (32, 224), (40, 8), (256, 224), (33, 224)):
        images = torch.randint(0, 256, (16, 3, side, side), dtype=torch.uint8)
        generator = torch.Generator().manual_seed(side)
        for boxes in (data.random_resized_boxes(16, side, generator, torch.device("cpu")),
                      data.random_shift_boxes(16, side, generator, torch.device("cpu")),  # partly outside
                      torch.tensor([[0.3, 1.7, side - 0.1, side]] * 16)):
            expected = roi_align(images.float(), torch.cat([torch.arange(16.0)[:, None], boxes], 1), size, 1.0, -1,
                                 True)
            assert torch.allclose(data.crop_resize(images, boxes, size), expected, atol=1e-3), (side, size)


def test_crop_resize_equals_torchvision_inside_the_crop():
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    top, left, h, w = 3, 5, 20, 17
    ours = data.crop_resize(images, torch.tensor([[left, top, left + w, top + h]] * 2, dtype=torch.float32), 64)
    reference = T.functional.resize(images[:, :, top:top + h, left:left + w].float(), [64, 64], antialias=False)
    assert torch.allclose(ours[:, :, 3:-3, 3:-3], reference[:, :, 3:-3, 3:-3], atol=1e-3)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "I;16", "CMYK", "1", "L"])
def test_any_image_mode_decodes_to_rgb(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    image = {"I;16": lambda: Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)),
             "P": lambda: rgb.convert("P")}.get(mode, lambda: rgb.convert(mode))()
    if mode == "P":  # the left half the transparent index (black in the palette)
        indices = np.asarray(image).copy()
        indices[:, :25] = 0
        image, palette = Image.fromarray(indices, "P"), image.getpalette()
        image.putpalette(palette)
        image.info["transparency"] = 0
    elif mode in ("RGBA", "LA"):  # the left half fully transparent
        alpha = np.full((40, 50), 255, np.uint8)
        alpha[:, :25] = 0
        image.putalpha(Image.fromarray(alpha))
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    image.save(path)
    pixels, shorter = data.decode(path, 32)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8 and shorter == 40
    if mode in ("RGBA", "LA", "P"):  # transparency over white, not over black or the hidden colour
        assert (pixels[:, :10] == 255).all() and (pixels[:, -10:] < 255).any()
    if mode == "I;16":  # 16-bit grey is scaled to 8 bits, not clipped to white
        assert abs(int(pixels.mean()) - int(np.asarray(rgb.convert("L").resize((40, 40))).mean())) < 20


@pytest.mark.parametrize("scale, expected", [(1.0, 255), (255.0, 255), (65535.0, 255)])
def test_a_float_tiff_is_scaled_by_its_range_not_clipped_to_black(tmp_path, scale, expected):
    ramp = np.linspace(0, 1, 40 * 50, dtype=np.float32).reshape(40, 50)  # a 32-bit float grey TIFF, 0 ... scale
    ramp[20, 25] = np.nan  # pixels[20, 20] after the centre crop
    Image.fromarray(ramp * scale, "F").save(tmp_path / "x.tif")
    assert Image.open(tmp_path / "x.tif").mode == "F"
    pixels, _ = data.decode(tmp_path / "x.tif", 40)
    assert abs(pixels.mean() - expected / 2) < 8 and pixels.max() >= expected - 5 and pixels[20, 20, 0] == 0


def test_an_abbreviated_flag_is_refused_not_taken_for_another(tmp_path, tiny_data):
    result = run("download.py", "--roo", tmp_path / "c", "--source", tiny_data, check=False)
    assert result.returncode == 2 and "unrecognized arguments: --roo" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_md5_in_capitals_is_checked_also_when_download_is_called(tmp_path, tiny_data):
    archive = tmp_path / "a.tar.gz"
    class_folder_archive(archive, tiny_data)
    download.download(tmp_path / "c", str(archive), md5(archive).upper())
    assert (tmp_path / "c" / "train").is_dir()


def test_a_device_member_is_refused_with_what_to_use_instead(tmp_path, tiny_data):
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tiny_data, "cifar10")
        tar.add("/dev/null", "cifar10/train/red/odd.png")  # a real character device, no mknod needed
    line = error_line(run("download.py", "--root", tmp_path / "c", "--source", archive, check=False))
    assert line.endswith("is a character device, not a regular file or folder; refusing to unpack it; "
                         "use the official archive or an archive or folder of class folders")


@pytest.mark.parametrize("member, change, what", [  # change(tmp_path): the doctored entries
    ("batches.meta", lambda tmp: {"label_names": CLASSES[:9] + [f"{tmp}/ABSOLUTE"]}, "ABSOLUTE' cannot be a folder"),
    ("batches.meta", lambda tmp: {"label_names": CLASSES[:9] + ["../../../ESCAPED"]}, "ESCAPED' cannot be a folder"),
    ("batches.meta", lambda tmp: {"label_names": CLASSES[:9] + [".."]}, "label name '..' cannot be a folder name"),
    ("batches.meta", lambda tmp: {"label_names": CLASSES[:9] + [""]}, "label name '' cannot be a folder name"),
    ("batches.meta", lambda tmp: {"label_names": CLASSES[:9] + ["a\0b"]}, "label name 'a\\x00b' cannot be a folder"),
    ("batches.meta", lambda tmp: {"label_names": CLASSES[:9] + ["cat"]}, "label names repeat"),
    ("batches.meta", lambda tmp: {"label_names": None}, "no list of label_names"),
    ("data_batch_3", lambda tmp: {"labels": [10] * 12}, "a label outside 0-9"),
    ("data_batch_3", lambda tmp: {"labels": [-1] * 12}, "a label outside 0-9"),
    ("test_batch", lambda tmp: {"labels": [0] * 11}, "labels are not a list of 12 integers"),
    ("test_batch", lambda tmp: {"data": np.zeros((12, 3, 32, 32), np.uint8)}, "data is not N x 3072 uint8"),
    ("data_batch_1", lambda tmp: {"data": np.zeros((12, 3072), np.float32)}, "data is not N x 3072 uint8"),
])
def test_a_doctored_official_tarball_is_refused_and_writes_nothing(tmp_path, member, change, what):
    archive = tmp_path / "cifar-10-python.tar.gz"
    official_tarball(archive, changes={member: change(tmp_path)})
    root = tmp_path / "cifar10"  # ../../../ESCAPED would land beside it
    line = error_line(run("download.py", "--root", root, "--source", archive, check=False))
    assert f"{archive}: cifar-10-batches-py/{member} is not the official format (" in line
    assert what in line and line.endswith("; download it again")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [archive]  # no PNG anywhere, inside or out


def test_a_full_disk_while_writing_the_cache_is_a_warning_and_leaves_no_temporary_file(small_filesystem, capsys):
    disk = small_filesystem("1m")
    root = make_class_folders(disk / "d", train=30, test=1)
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    (disk / "filler").write_bytes(bytes(free - 64 * 1024))  # 64 KB left, 270 KB of images to cache
    cache = root / ".cache" / "train.u8"
    images = data.load_folder(root / "train")
    warning = capsys.readouterr().err
    assert f"warning: cannot write the image cache {cache} (No space left on device); decoding every run" in warning
    assert list(cache.parent.iterdir()) == [] and images.images.shape == (90, 3, 32, 32)
    assert not list(Path(tempfile.gettempdir()).glob(f".images.u8.{os.getpid()}.*"))  # the fallback file: unlinked


def interrupted_decode(path, size):
    raise KeyboardInterrupt


def test_an_interrupted_cache_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    root = make_class_folders(tmp_path / "d", train=3, test=1)
    data.load_folder(root / "train")
    (root / "train" / "red" / "0000.png").touch()  # changed: the cache is rebuilt
    monkeypatch.setattr(data, "decode", interrupted_decode)
    with pytest.raises(KeyboardInterrupt):
        data.load_folder(root / "train", size=32)
    # the old cache, whole: its metadata is removed only when new images replace it
    assert sorted(p.name for p in (root / ".cache").iterdir()) == ["train.json", "train.u8"]
    monkeypatch.undo()
    assert data.load_folder(root / "train").images.shape == (9, 3, 32, 32)


class RemovedBeforeLocking:
    """fcntl.flock for cli.Lock, in the order of a race between three processes: Lock has opened the lock file;
    its holder removes it and ends; a newcomer creates a new one (and locks it, if `newcomer_locks`); then Lock locks
    the file it opened."""

    def __init__(self, path: Path, newcomer_locks: bool) -> None:
        self.path, self.newcomer_locks, self.newcomer = path, newcomer_locks, None
        self.flock = fcntl.flock

    def __call__(self, file, operation) -> None:
        if self.newcomer is None:
            self.path.unlink()
            self.newcomer = open(self.path, "a+")
            self.newcomer.write("4242")
            self.newcomer.flush()
            if self.newcomer_locks:
                self.flock(self.newcomer, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.flock(file, operation)


@pytest.mark.parametrize("newcomer_locks", [True, False])
def test_a_lock_file_removed_before_it_is_locked_is_not_held(tmp_path, monkeypatch, newcomer_locks):
    path = tmp_path / ".c.lock"
    race = RemovedBeforeLocking(path, newcomer_locks)
    monkeypatch.setattr(fcntl, "flock", race)
    try:
        if newcomer_locks:  # two holders, unless Lock sees the file it locked is no longer the lock file
            with pytest.raises(RuntimeError, match="held by 4242"):
                cli.Lock(path, lambda owner: RuntimeError(f"held by {owner}"))
        else:
            with cli.Lock(path, lambda owner: RuntimeError(f"held by {owner}")) as lock:
                assert os.fstat(lock.file.fileno()).st_ino == path.stat().st_ino
                assert path.read_text() == str(os.getpid())
    finally:
        race.newcomer.close()


@pytest.mark.parametrize("kind", ["a link to /dev/zero", "a FIFO"])
def test_a_device_or_fifo_in_a_source_folder_is_refused_before_copying(tmp_path, kind):
    source = make_class_folders(tmp_path / "source", train=2, test=1)
    odd = source / "train" / "red" / "odd.png"
    if kind == "a FIFO":
        os.mkfifo(odd)
    else:
        odd.symlink_to("/dev/zero")  # a copy would read it forever
    expected = ("is a character device (through a link)" if kind != "a FIFO" else "is a FIFO") + \
        ", not a regular file or folder; remove it"
    # the walk first, called alone: a copy that began would never end
    with pytest.raises(cli.DataError, match=f"--source {source}: {odd} {re.escape(expected)}"):
        download.source_files(source, str(source))
    result = run("download.py", "--root", tmp_path / "c", "--source", source, check=False)
    assert error_line(result) == f"download.py: --source {source}: {odd} {expected}"
    assert [p.name for p in tmp_path.iterdir()] == ["source"]


def test_a_source_folder_larger_than_the_disk_at_root_is_one_line(tmp_path, small_filesystem):
    disk = small_filesystem("64k")
    source = make_class_folders(tmp_path / "source", train=8, test=2)  # 30 files of 3 KB, each a 4 KB page at least
    result = run("download.py", "--root", disk / "c", "--source", source, check=False)
    line = error_line(result)
    named = re.escape(f"download.py: --source {source}: cannot copy {source}/")
    assert re.fullmatch(named + r"(train|test)/[a-z]+/[0-9]+\.png \(No space left on device\); free space or choose "
                        "another --root", line), line
    assert result.stderr.count("\n") == 1 and os.listdir(disk) == []


def test_a_full_disk_while_unpacking_names_root_not_the_archive(tmp_path, small_filesystem):
    disk = small_filesystem("64k")
    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:  # 4 KB declared, but each file takes a 4 KB page of the 64 KB
        for i in range(40):
            info = tarfile.TarInfo(f"cifar10/{'train' if i % 2 else 'test'}/a/{i}.png")
            info.size = 100
            tar.addfile(info, io.BytesIO(bytes(100)))
    line = error_line(run("download.py", "--root", disk / "c", "--source", archive, check=False))
    assert line == f"download.py: --root {disk / 'c'}: cannot write (No space left on device); free space or choose " \
        "another --root"
    assert os.listdir(disk) == []


def at_time_zero(member: tarfile.TarInfo) -> tarfile.TarInfo:
    """Files' times out of an archive, which then holds the same bytes whenever the test runs."""
    member.mtime = 0
    return member


@pytest.mark.parametrize("suffix", [".tar.gz", ".tar.xz"])  # gzip: an OSError without errno; xz: LZMAError
def test_a_damaged_compressed_archive_is_called_damaged(tmp_path, tiny_data, suffix):
    archive = tmp_path / f"a{suffix}"
    with tarfile.open(archive, f"w:{suffix[5:]}") as tar:
        tar.add(tiny_data, "cifar10", filter=at_time_zero)  # the same bytes every run: the same damage
    payload = bytearray(archive.read_bytes())
    payload[len(payload) // 2:len(payload) // 2 + 64] = bytes(64)  # a stretch of the compressed stream lost
    archive.write_bytes(payload)
    line = error_line(run("download.py", "--root", tmp_path / "c", "--source", archive, check=False))
    assert f"{archive}: damaged or incomplete archive (" in line and line.endswith("; download it again")
    assert sorted(p.name for p in tmp_path.iterdir()) == [archive.name]


@pytest.mark.parametrize("flag", ["--root", "--source"])
def test_an_empty_path_is_an_argparse_error_not_the_current_folder(tmp_path, flag):
    result = run("download.py", flag, "", check=False, cwd=tmp_path)
    assert result.returncode == 2 and f"argument {flag}: is empty; pass a path" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_source_url_that_is_not_fetched_is_named_as_a_url(tmp_path, tiny_data):
    archive = tmp_path / "my data.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tiny_data, arcname="set")
    result = run("download.py", "--root", tmp_path / "root", "--source", archive.as_uri(), check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert error_line(result) == (f"download.py: --source {archive.as_uri()}: a file: URL; pass the path itself: "
                                  f"--source {archive}")  # before: "no such file or folder" for a file that exists
    result = run("download.py", "--root", tmp_path / "root", "--source", "s3://bucket/set.tar", check=False)
    assert error_line(result).startswith("download.py: --source s3://bucket/set.tar: a URL download.py does not "
                                         "fetch (s3:); pass an http, https or ftp URL")
    run("download.py", "--root", tmp_path / "root", "--source", archive)  # the advice works
    assert not list(tmp_path.glob(".root.*partial*"))


def test_a_malformed_url_is_one_line(tmp_path):
    result = run("download.py", "--root", tmp_path / "root", "--source", "http://[x/a.tgz", check=False)
    assert error_line(result) == ("download.py: --source http://[x/a.tgz: not a valid URL (Invalid IPv6 URL); "
                                  "correct it, or pass an archive or a folder")  # before: a ValueError's traceback
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("root", [".", "..", "./"])
def test_a_root_named_by_dot_or_dot_dot_is_one_line_not_remove_it(tmp_path, tiny_data, root):
    here = tmp_path / "empty" / "here"
    here.mkdir(parents=True)
    result = run("download.py", "--root", root, "--source", tiny_data, check=False, cwd=here)
    # before: "exists but holds no train/ and test/ folders; remove it" for an empty folder (its own lock inside)
    assert error_line(result) == (f"download.py: --root {Path(root)}: is {(here / root).resolve()}, named by '.' "
                                  "or '..' (or the top folder): the data set is built beside a named --root, then "
                                  "renamed to it; pass the name of a folder to create, e.g. --root data/cifar10")
    assert [p.name for p in (tmp_path / "empty").rglob("*")] == ["here"]  # no lock, no temporary folder


def test_a_complete_data_set_named_by_dot_is_still_found(tmp_path, tiny_data):
    run("download.py", "--root", tmp_path / "set", "--source", tiny_data)
    assert "already holds train/ and test/" in run("download.py", "--root", ".", cwd=tmp_path / "set").stdout


def user_cache_folders(home: Path) -> list[Path]:
    return sorted((home / "alexnet-image-cache").iterdir())


def test_a_read_only_data_folder_without_a_valid_cache_caches_in_the_users_cache_folder(small_filesystem, tmp_path,
                                                                                        monkeypatch, capsys):
    """Before: `OSError: [Errno 30] Read-only file system: '.../.cache/train.json'` traceback."""
    disk = small_filesystem("4m")
    root = make_class_folders(disk / "d", train=3, test=1)
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home"))
    images = data.load_folder(root / "train")
    [folder] = user_cache_folders(tmp_path / "home")
    assert capsys.readouterr().err == (f"warning: cannot write the image cache in {root / '.cache'} (Read-only file "
                                       f"system); it goes to {folder}\n")
    assert sorted(p.name for p in folder.iterdir()) == ["train.json", "train.u8"] and images.images.shape[0] == 9
    monkeypatch.setattr(data, "decode", interrupted_decode)  # the second time, read from that cache
    assert torch.equal(data.load_folder(root / "train").images, images.images)


def test_a_damaged_cache_in_a_read_only_data_folder_is_said_damaged_only_while_decoded(small_filesystem, tmp_path,
                                                                                       monkeypatch, capsys):
    """Before: every later run warned "damaged; decoding the images again", and read the user's cache."""
    disk = small_filesystem("4m")
    root = make_class_folders(disk / "d", train=3, test=1)
    pixels = data.load_folder(root / "train").images.clone()
    with open(root / ".cache" / "train.u8", "r+b") as f:
        f.write(bytes(100))
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home"))
    for attempt in ("first", "second"):  # each a new process: where the cache goes is decided afresh
        data.cache_folder.cache_clear()
        capsys.readouterr()
        assert torch.equal(data.load_folder(root / "train").images, pixels)
        assert ("the image cache is damaged" in capsys.readouterr().err) == (attempt == "first")
        monkeypatch.setattr(data, "decode", interrupted_decode)  # the second time, read from the user's cache


def test_a_file_named_dot_cache_in_the_data_folder_moves_the_cache_with_a_warning(tmp_path, monkeypatch, capsys):
    """Before: a NotADirectoryError traceback."""
    root = make_class_folders(tmp_path / "d", train=3, test=1)
    (root / ".cache").write_text("mine")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home"))
    data.load_folder(root / "train")
    data.load_folder(root / "test")
    [folder] = user_cache_folders(tmp_path / "home")
    assert capsys.readouterr().err == (f"warning: cannot write the image cache in {root / '.cache'} (File exists); "
                                       f"it goes to {folder}\n")  # once for the data folder
    assert (root / ".cache").read_text() == "mine"
    assert sorted(p.name for p in folder.iterdir()) == ["test.json", "test.u8", "train.json", "train.u8"]
    data.cache_folder.cache_clear()  # before: a relative XDG_CACHE_HOME was taken in the current folder
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.chdir(tmp_path)
    assert data.cache_folder(root) == tmp_path / "user" / ".cache" / "alexnet-image-cache" / folder.name


def test_a_refused_cache_build_keeps_the_valid_caches_metadata(small_filesystem, monkeypatch, capsys):
    """--stored-size 1024 refused for space: before, the valid cache's metadata was deleted first (all re-decoded)."""
    disk = small_filesystem("1m")
    root = make_class_folders(disk / "d", train=3, test=1)
    data.load_folder(root / "train")
    monkeypatch.setattr(tempfile, "tempdir", str(disk))  # the fallback for the decoded images: as full
    with pytest.raises(cli.DataError, match="cannot hold the decoded images"):
        data.load_folder(root / "train", size=1024)
    assert sorted(p.name for p in (root / ".cache").iterdir()) == ["train.json", "train.u8"]


def test_a_root_with_a_tilde_the_shell_left_unexpanded_makes_no_folder_named_tilde(tiny_data, tmp_path):
    """`download.py --root=~/x`: before, a folder named ~ was made here."""
    result = run("download.py", "--root=~/x", "--source", tiny_data, check=False, cwd=tmp_path)
    assert error_line(result) == ("download.py: --root ~/x: starts with a ~ the shell did not expand (it would make a "
                                  "folder named ~ here); write --root ~/x with a space after --root, or $HOME for ~")
    assert os.listdir(tmp_path) == []
