"""data.Loader: data.py as a library for a training loop of one's own, and README's example of it, run."""
import re
import shutil
import subprocess
import sys

import pytest
import torch

import data
from conftest import ROOT, bare_environment, make_class_folders


@pytest.fixture(scope="module")
def train_folder(tmp_path_factory):
    return make_class_folders(tmp_path_factory.mktemp("loader"), train=10, test=1, size=16) / "train"


def test_each_epoch_is_a_new_order_of_every_image_augmented_as_training_augments(train_folder):
    loader = data.Loader(train_folder, batch_size=8, size=64, epochs=2, seed=3)
    batches = list(loader)
    assert len(batches) == len(loader) == 8 and [len(y) for _, y in batches] == [8, 8, 8, 6] * 2
    images = data.load_folder(train_folder)
    generator = torch.Generator().manual_seed(3)
    for epoch in range(2):  # pretrain.py's draws: the order, then each batch's augmentation, from one generator
        order = torch.randperm(30, generator=generator)
        for step, (x, y) in enumerate(images.batches(order, 0, 8)):
            got_x, got_y = batches[4 * epoch + step]
            assert torch.equal(got_x, data.train_batch(x, 64, generator)) and torch.equal(got_y, y)
        labels = torch.cat([y for _, y in batches[4 * epoch:4 * epoch + 4]])
        assert sorted(labels.tolist()) == sorted(images.labels.tolist())  # every image once
    assert got_x.shape == (6, 3, 64, 64) and got_x.dtype == torch.float32


def test_drop_last_shuffle_and_evaluation_batches(train_folder):
    images = data.load_folder(train_folder)
    dropped = data.Loader(images, batch_size=8, size=64, drop_last=True)
    assert len(dropped) == 3 and [len(y) for _, y in dropped] == [8, 8, 8]
    in_turn = data.Loader(images, batch_size=8, size=64, shuffle=False)
    assert torch.equal(torch.cat([y for _, y in in_turn]), images.labels)
    test = data.Loader(images, batch_size=8, size=64, train=False)  # in turn, centre-cropped: predict.py's transform
    for (x, y), start in zip(test, range(0, 30, 8)):
        assert torch.equal(x, data.eval_batch(images.images[start:start + 8], 64))
        assert torch.equal(y, images.labels[start:start + 8])


def test_batches_are_in_torchs_default_dtype_as_torchvisions_to_tensor_gives_them(train_folder):
    """A float64 training loop (torch.set_default_dtype) gets float64 batches; before, training ones were an error."""
    images = data.load_folder(train_folder)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        dtypes = {x.dtype for train in (True, False) for x, _ in data.Loader(images, 8, 32, train=train, cutout=0.25)}
    finally:
        torch.set_default_dtype(before)
    assert dtypes == {torch.float64}


SPAWN = "import multiprocessing\nmultiprocessing.set_start_method('spawn', force=True)\n"  # macOS's and Windows'


@pytest.mark.parametrize("argument, message", [
    ({"batch_size": 0}, "batch_size must be at least 1, got 0"),
    ({"batch_size": -1}, "batch_size must be at least 1, got -1"),
    ({"epochs": -1}, "epochs must be at least 0, got -1"),
    ({"size": 0}, "size must be at least 1, got 0"),
    ({"augmentation": "bogus"}, "augmentation 'bogus' is none of crop, rrc"),
    ({"cutout": 16}, r"cutout must be at least 0 and below 1 \(a share of the side\), got 16"),  # was all black
    ({"cutout": float("nan")}, r"cutout must be at least 0 and below 1 \(a share of the side\), got nan"),
    ({"cutout": -0.5}, r"cutout must be at least 0 and below 1 \(a share of the side\), got -0.5"),
    ({"batch_size": 31, "drop_last": True}, "drop_last with batch_size 31 leaves no batch of 30 images"),
    ({"device": "gpu"}, "device 'gpu' is no device name, or none this machine has; pass e.g. 'cpu', 'cuda' or 'mps'"),
    *[({"device": kind}, f"device '{kind}' is no device name, or none this machine has; pass e.g. 'cpu', 'cuda' or "
                         "'mps'") for kind, present in (("cuda", torch.cuda.is_available()),
                                                       ("mps", torch.backends.mps.is_available())) if not present]])
def test_arguments_that_cannot_work_are_refused_when_the_loader_is_made(train_folder, argument, message):
    """Before: a ZeroDivisionError or KeyError at the first batch, or (a negative batch size, drop_last with a batch
    larger than the set) no batch at all; a cutout of 1 or more blanked every image."""
    with pytest.raises(ValueError, match=f"^Loader: {message}$"):
        data.Loader(train_folder, **({"batch_size": 8, "size": 64} | argument))


def test_a_data_folder_given_as_a_split_is_one_line_not_two_classes(train_folder):
    """Before: train/ and test/ taken as two classes, each image labelled by its split, and a cache beside it."""
    with pytest.raises(data.cli.DataError, match=f"^{train_folder.parent}: a data folder \\(train/ and test/\\), not "
                       f"one split's class folders; pass {train_folder.parent}/train or {train_folder.parent}/test$"):
        data.Loader(train_folder.parent, batch_size=8, size=64)
    assert not (train_folder.parent.parent / ".cache" / f"{train_folder.parent.name}.u8").exists()


def test_a_data_folder_with_more_than_train_and_test_is_no_split_either(tmp_path):
    """Before: only exactly train/ and test/ were caught; with a valid/ beside them, three classes named by split."""
    root = make_class_folders(tmp_path / "d", train=2, test=1, size=16)
    shutil.copytree(root / "test", root / "valid")
    with pytest.raises(data.cli.DataError, match="a data folder \\(train/ and test/\\), not one split's"):
        data.load_folder(root)


def readme_example() -> str:
    return re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[1]


def test_readme_example_is_short():
    assert len(readme_example().splitlines()) <= 15


@pytest.mark.slow  # a new interpreter is what is tested
def test_readme_example_trains_with_model_cli_and_data_alone(tmp_path):
    """As a script file on macOS or Windows (spawn: each decoding process imports the script again; unguarded, the
    first one started another process while it was being imported: BrokenProcessPool)."""
    for name in ("model.py", "cli.py", "data.py"):
        shutil.copy(ROOT / name, tmp_path)
    (tmp_path / "train.py").write_text(readme_example())
    (tmp_path / "shim").mkdir()
    (tmp_path / "shim" / "sitecustomize.py").write_text(SPAWN)
    make_class_folders(tmp_path / "data" / "cifar10", train=100, test=2, size=16)  # 300: a pool of processes decodes
    result = subprocess.run([sys.executable, "train.py"], cwd=tmp_path, capture_output=True, text=True,
                            env=bare_environment(HOME=str(tmp_path), PYTHONPATH=str(tmp_path / "shim")))
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"test accuracy: \d+\.\d%\n", result.stdout)
