import os
import random
import re
import threading
import weakref
from pathlib import Path

import pytest
import torch
import torch.utils._pytree as pytree
import torchvision
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils._python_dispatch import TorchDispatchMode

from model import EMA, AlexNet, CheckpointError, checkpoint_dict, load_checkpoint, load_matching, model_from_checkpoint
from pretrain import save_checkpoint


def test_layers_and_parameter_count_match_the_reference():
    model = AlexNet()
    assert sum(p.numel() for p in model.parameters()) == 44_428_106
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0]) for c in convs] == [
        (3, 64, 11, 4, 2), (64, 192, 5, 1, 2), (192, 384, 3, 1, 1), (384, 256, 3, 1, 1), (256, 256, 3, 1, 1)]
    linears = [m for m in model.classifier if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(9216, 4096), (4096, 1024), (1024, 10)]
    assert model.classifier[6] is linears[-1]
    assert [m.p for m in model.classifier if isinstance(m, torch.nn.Dropout)] == [0.5, 0.5]


def test_hidden_widths_change_only_the_classifiers_sizes():
    model, reference = AlexNet(num_classes=3, hidden=(64, 32)), AlexNet(num_classes=3)
    linears = [m for m in model.classifier if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(9216, 64), (64, 32), (32, 3)]
    assert list(model.state_dict()) == list(reference.state_dict())
    assert model(torch.randn(2, 3, 63, 63)).shape == (2, 3)


@pytest.mark.parametrize("size", [63, 96, 224])
def test_output_shape(size):
    assert AlexNet(num_classes=7, hidden=(64, 32))(torch.randn(2, 3, size, size)).shape == (2, 7)


def test_smallest_input_that_fails():
    with pytest.raises(RuntimeError):
        AlexNet(hidden=(64, 32))(torch.randn(1, 3, 62, 62))


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod."])
def test_torchvision_state_dict_loads_by_name(prefix):
    reference = torchvision.models.alexnet(weights=None).state_dict()
    model = AlexNet()
    loaded, skipped = load_matching(model, {prefix + k: v for k, v in reference.items()})
    assert skipped == ["classifier.4.bias", "classifier.4.weight", "classifier.6.bias", "classifier.6.weight"]
    assert len(loaded) == 12  # five convolutions and classifier[1], weight and bias each
    for name in loaded:
        assert torch.equal(model.state_dict()[name], reference[name])


def test_checkpoint_roundtrip_loads_weights_only(tmp_path):
    model = AlexNet(num_classes=3, hidden=(8, 4))
    path = tmp_path / "c.pt"
    save_checkpoint(checkpoint_dict(model, ["a", "b", "c"], 64, 32), path)
    torch.load(path, weights_only=True)
    rebuilt = model_from_checkpoint(load_checkpoint(path))
    assert rebuilt.classifier[4].out_features == 4
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), model.state_dict().values()))
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint({"version": 1}, path)

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"version": 2}, path)
    assert torch.load(path, weights_only=True) == {"version": 1}
    assert os.listdir(tmp_path) == ["c.pt"]


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    RunsCode.marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": RunsCode(), "model_args": {}}, path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert not RunsCode.marker.exists()
    message = str(error.value)
    assert "not a loadable checkpoint: it holds objects other than tensors" in message and "\n" not in message
    assert "weights_only" not in message  # torch's advice to load it unsafely is never passed on


def test_checkpoint_of_another_class_count_is_a_clear_error(tmp_path):
    checkpoint = {"model": AlexNet(num_classes=5, hidden=(8, 4)).state_dict(),
                  "model_args": {"num_classes": 10, "dropout": 0.5, "hidden": (8, 4)}}
    with pytest.raises(CheckpointError, match=r"do not fit AlexNet.*classifier\.6"):
        model_from_checkpoint(checkpoint, "x.pt")


@pytest.mark.parametrize("model_args, problem", [
    ({"num_classes": 3, "foo": 1}, "hold 'foo', not arguments of AlexNet (num_classes, dropout, hidden)"),
    ({"num_classes": 0}, "do not say how many classes the head has"),
    ({"num_classes": 3.0}, "do not say how many classes the head has"),
    ({"num_classes": True}, "do not say how many classes the head has"),  # bool is an int to Python
    ({"num_classes": 3, "dropout": 1.0}, "hold a dropout that is not a probability in [0, 1)"),
    ({"num_classes": 3, "dropout": "0.5"}, "hold a dropout that is not a probability in [0, 1)"),
    ({"num_classes": 3, "dropout": True}, "hold a dropout that is not a probability in [0, 1)"),
    ({"num_classes": 3, "hidden": (64,)}, "hold hidden widths that are not two integers >= 1"),
    ({"num_classes": 3, "hidden": (64, 0)}, "hold hidden widths that are not two integers >= 1"),
    ({"num_classes": 3, "hidden": "64,32"}, "hold hidden widths that are not two integers >= 1"),
    ({"num_classes": 3, "hidden": (64.0, 32)}, "hold hidden widths that are not two integers >= 1"),
    ([3], "are not a dict of AlexNet's arguments"),
])
def test_model_args_alexnet_cannot_take_are_refused_naming_the_file(tmp_path, model_args, problem):
    path = tmp_path / "odd.pt"
    torch.save({"model": {}, "model_args": model_args, "classes": ["a", "b", "c"], "image_size": 64,
                "stored_size": 32}, path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert str(error.value).startswith(f"{path}: inconsistent checkpoint: model_args ")
    assert problem in str(error.value) and str(error.value).endswith("; re-train or pass another file")


def test_weights_of_other_names_are_a_short_line_that_says_what_to_do():
    renamed = {f"net.{name}": tensor for name, tensor in AlexNet(num_classes=3, hidden=(8, 4)).state_dict().items()}
    with pytest.raises(CheckpointError) as error:
        model_from_checkpoint({"model": renamed, "model_args": {"num_classes": 3}}, "x.pt")
    message = str(error.value)
    assert message.startswith("x.pt: weights do not fit AlexNet({'num_classes': 3}): missing classifier.1.bias, "
                              "classifier.1.weight, classifier.4.bias and 13 more, unexpected net.classifier.1.bias, ")
    assert message.endswith("re-train or pass another file") and "\n" not in message and len(message) < 400


def test_a_checkpoint_whose_model_is_no_state_dict_is_refused():
    with pytest.raises(CheckpointError, match="x.pt: its model is a Tensor, not a state dict of tensors; re-train"):
        model_from_checkpoint({"model": torch.zeros(3), "model_args": {"num_classes": 3}}, "x.pt")


def test_a_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(AlexNet(hidden=(8, 4)).state_dict(), path)
    with pytest.raises(CheckpointError, match="not a checkpoint of this project"):
        load_checkpoint(path)
    (tmp_path / "truncated.pt").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated.pt: not a checkpoint file"):
        load_checkpoint(tmp_path / "truncated.pt")


@pytest.mark.parametrize("content", [random.Random(0).randbytes(5000), bytes(5000), b"hello\n", b"cats and dogs\n",
                                     b"PK\x05\x06" + bytes(18)], ids=["random", "zeros", "hello", "cats", "empty zip"])
def test_garbage_as_a_checkpoint_is_one_line_that_never_advises_unsafe_loading(tmp_path, content):
    """Random bytes, zeros (as from /dev/zero), text, an empty zip: torch's errors say "(101)" or advise
    weights_only=False, which would run any code the file holds."""
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert str(error.value) == (f"{path}: not a checkpoint file (not a PyTorch zip archive, or damaged); pass a "
                                "checkpoint that this project's training wrote")


def test_a_folder_or_fifo_as_a_checkpoint_is_named_and_never_read(tmp_path):
    """A FIFO would hang torch.load waiting for a writer; both were called "no such checkpoint file"."""
    os.mkfifo(tmp_path / "fifo.pt")
    with pytest.raises(CheckpointError, match=r"fifo\.pt: not a regular file \(a device, FIFO or socket\); pass a "):
        load_checkpoint(tmp_path / "fifo.pt")
    with pytest.raises(CheckpointError, match=f"{tmp_path}: is a folder; pass a checkpoint file"):
        load_checkpoint(tmp_path)
    (tmp_path / "notes").write_text("a file")
    with pytest.raises(CheckpointError, match=f"{tmp_path}/notes/m.pt: cannot read it \\(Not a directory\\); pass a "):
        load_checkpoint(tmp_path / "notes" / "m.pt")


@pytest.mark.parametrize("change,problem", [
    ({"classes": "abc"}, "its classes are not a list of names"),
    ({"classes": ["a", "b", 3]}, "its classes are not a list of names"),
    ({"classes": ["a", "a", "b"]}, "it names 3 classes (2 different) for a head of 3 outputs"),  # one repeated
    ({"image_size": 32}, "image_size 32 (at least 63) or stored_size 32 is not a size"),
    ({"stored_size": 0.5}, "image_size 64 (at least 63) or stored_size 0.5 is not a size"),
    ({"eval_resize": "x"}, "eval_resize 'x' is not a finite factor of at least 1 (the resize before the centre crop)"),
    ({"eval_resize": float("inf")}, "eval_resize inf is not a finite factor of at least 1 (the resize before the "
                                    "centre crop)"),
    ({"eval_resize": 0.5}, "eval_resize 0.5 is not a finite factor of at least 1 (the resize before the centre "
                           "crop)"),  # a crop larger than the image resized
    ({"temperature": "x"}, "temperature 'x' is not a number from 0.05 to 20.0"),
    ({"temperature": 0.0}, "temperature 0.0 is not a number from 0.05 to 20.0"),
    ({"temperature": 1e-40}, "temperature 1e-40 is not a number from 0.05 to 20.0"),  # logits / T: inf, then NaN
    ({"temperature": float("nan")}, "temperature nan is not a number from 0.05 to 20.0"),
    ({"tta": "yes"}, "tta 'yes' is not True or False"),
])
def test_classes_or_sizes_that_are_no_such_things_are_an_inconsistent_checkpoint(tmp_path, change, problem):
    checkpoint = checkpoint_dict(AlexNet(num_classes=3, hidden=(8, 8)), ["a", "b", "c"], 64, 32) | change
    torch.save(checkpoint, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=re.escape(f"odd.pt: inconsistent checkpoint: {problem}; re-train")):
        load_checkpoint(tmp_path / "odd.pt")


def test_evaluation_values_written_as_ints_are_taken(tmp_path):
    """A temperature or resize written as an int (a file edited by hand: `checkpoint["temperature"] = 2`; a resize of
    exactly 1, the least): numbers the evaluation takes, as fit_temperature's float is."""
    edited = {"temperature": 2, "eval_resize": 1, "tta": True}
    torch.save(checkpoint_dict(AlexNet(num_classes=3, hidden=(8, 8)), ["a", "b", "c"], 64, 32) | edited,
               tmp_path / "edited.pt")
    assert load_checkpoint(tmp_path / "edited.pt").items() >= edited.items()


def test_background_writer_saves_the_state_at_the_call(tmp_path, monkeypatch):
    from cli import CheckpointWriter
    release = threading.Event()
    real_save = torch.save

    def slow_save(obj, f):
        release.wait(10)
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", slow_save)
    weights = torch.zeros(4)
    with CheckpointWriter(save_checkpoint) as writer:
        writer.save_together({tmp_path / "c.pt": {"w": weights}})
        assert not (tmp_path / "c.pt").exists()  # save returned while the write waits
        weights += 1  # training goes on changing the tensor
        release.set()
    assert torch.equal(torch.load(tmp_path / "c.pt", weights_only=True)["w"], torch.zeros(4))


def test_background_writer_raises_a_failed_write(tmp_path, monkeypatch):
    from cli import CheckpointWriter
    save_checkpoint({"version": 1}, tmp_path / "c.pt")

    def disk_full(obj, f):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    writer = CheckpointWriter(save_checkpoint)
    writer.save_together({tmp_path / "c.pt": {"version": 2}})
    with pytest.raises(CheckpointError, match="No space left on device"):
        writer.wait()
    assert torch.load(tmp_path / "c.pt", weights_only=True) == {"version": 1}


class SlowDisk:
    """The writer's `write` (pretrain.save_checkpoint): records which version of which file each write was given, in
    order, and holds every write until `release` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.written: list[tuple[str, int]] = []

    def __call__(self, checkpoint: dict, path) -> None:
        self.written.append((Path(path).name, checkpoint["version"]))
        self.started.set()
        assert self.release.wait(60), "the test never released the disk"
        save_checkpoint(checkpoint, path)


class CountedCopies:
    """Wraps cli.to_cpu: counts the copies alive (each test checkpoint holds one tensor) and the most seen."""

    def __init__(self, to_cpu) -> None:
        self.to_cpu = to_cpu
        self.alive = weakref.WeakValueDictionary()  # id -> tensor, for as long as the tensor lives
        self.most = 0

    def __call__(self, obj, reuse=None):
        copy = self.to_cpu(obj, reuse)
        if isinstance(copy, dict):  # not the calls for the tensors inside
            self.alive[id(copy["w"])] = copy["w"]
            self.most = max(self.most, len(self.alive))
        return copy


def state(version: int) -> dict:
    return {"w": torch.full((1000,), float(version)), "version": version}


def test_background_writer_keeps_only_the_newest_state_of_each_file_while_the_disk_is_slow(tmp_path, monkeypatch):
    import cli
    disk, copies = SlowDisk(), CountedCopies(cli.to_cpu)
    monkeypatch.setattr(cli, "to_cpu", copies)
    with cli.CheckpointWriter(disk) as writer:
        writer.save_together({tmp_path / "last.pt": state(0)})
        assert disk.started.wait(60)  # the first write is under way and stays there until released
        for version in range(1, 41):  # a resume state every epoch, a best checkpoint every other one
            writer.save_together({tmp_path / ("last.pt" if version % 2 else "best.pt"): state(version)})
        assert len(copies.alive) == 3  # the one being written and the newest of each file
        disk.release.set()
        writer.wait()
        assert disk.written == [("last.pt", 0), ("last.pt", 39), ("best.pt", 40)]
    assert copies.most <= 4  # two per file: one being written or kept for reuse, one waiting or being copied
    assert not writer.thread.is_alive() and len(copies.alive) == 0  # the thread ended and let go of its copies
    for name, version in (("last.pt", 39), ("best.pt", 40)):
        assert torch.load(tmp_path / name, weights_only=True)["version"] == version


def test_background_writer_writes_in_the_order_of_the_newest_saves(tmp_path, monkeypatch):
    import cli
    disk = SlowDisk()
    with cli.CheckpointWriter(disk) as writer:
        writer.save_together({tmp_path / "best.pt": state(0)})
        assert disk.started.wait(60)
        writer.save_together({tmp_path / "last.pt": state(0)})
        writer.save_together({tmp_path / "best.pt": state(1)})
        writer.save_together({tmp_path / "last.pt": state(1)})  # saved after best.pt's newest: written after it
        disk.release.set()
    assert disk.written == [("best.pt", 0), ("best.pt", 1), ("last.pt", 1)]


class FreesTheDiskMidSave:
    """Wraps cli.to_cpu: during the first copy it lets the writer write all it has, as a fast disk may."""

    def __init__(self, to_cpu, disk: SlowDisk) -> None:
        self.to_cpu, self.disk = to_cpu, disk
        self.writer = None

    def __call__(self, obj, reuse=None):
        if self.writer is not None and isinstance(obj, dict):
            writer, self.writer = self.writer, None
            self.disk.release.set()
            writer.wait()
        return self.to_cpu(obj, reuse)


def test_a_resume_state_never_reaches_the_disk_before_the_best_checkpoint_saved_with_it(tmp_path, monkeypatch):
    """The best checkpoint and the resume state of an epoch: an older resume state, naming a best checkpoint that
    the newer one replaced before it was written, never reaches the disk."""
    import cli
    disk = SlowDisk()
    copies = FreesTheDiskMidSave(cli.to_cpu, disk)
    monkeypatch.setattr(cli, "to_cpu", copies)
    with cli.CheckpointWriter(disk) as writer:
        writer.save_together({tmp_path / "last.pt": state(0)})
        assert disk.started.wait(60)
        writer.save_together({tmp_path / "best.pt": state(1), tmp_path / "last.pt": state(1)})
        copies.writer = writer
        writer.save_together({tmp_path / "best.pt": state(2), tmp_path / "last.pt": state(2)})
    assert disk.written == [("last.pt", 0), ("best.pt", 2), ("last.pt", 2)]


class KeptCopies:
    """Wraps cli.to_cpu and keeps every checkpoint copy it makes."""

    def __init__(self, to_cpu) -> None:
        self.to_cpu = to_cpu
        self.made: list[dict] = []

    def __call__(self, obj, reuse=None):
        copy = self.to_cpu(obj, reuse)
        if isinstance(copy, dict):  # not the calls for the tensors inside
            self.made.append(copy)
        return copy


def test_a_save_copies_into_the_memory_of_a_written_copy(tmp_path, monkeypatch):
    import cli
    copies = KeptCopies(cli.to_cpu)
    monkeypatch.setattr(cli, "to_cpu", copies)
    with cli.CheckpointWriter(save_checkpoint) as writer:
        for version in range(3):
            writer.save_together({tmp_path / "c.pt": state(version)})
            writer.wait()
    first, *later = [copy["w"].untyped_storage().data_ptr() for copy in copies.made]
    assert later == [first, first]
    assert torch.load(tmp_path / "c.pt", weights_only=True)["w"][0] == 2


def test_to_cpu_reuses_only_tensors_of_the_same_shape_and_dtype():
    from cli import to_cpu
    same, other_shape, other_dtype = torch.zeros(3), torch.zeros(4), torch.zeros(3, dtype=torch.float64)
    source = {"a": torch.ones(3), "b": [torch.ones(3), torch.ones(3), 7], "c": None}
    copy = to_cpu(source, reuse={"a": same, "b": [other_shape, other_dtype, 7], "c": torch.zeros(3)})
    assert copy["a"] is same and torch.equal(same, torch.ones(3))
    assert copy["b"][0] is not other_shape and copy["b"][1] is not other_dtype
    assert torch.equal(other_shape, torch.zeros(4)) and copy["b"][2] == 7 and copy["c"] is None
    copy["b"][0] += 1
    assert torch.equal(source["b"][0], torch.ones(3))  # a copy, not the original


@pytest.mark.parametrize("key", ["model", "ema"])
def test_a_checkpoint_with_non_finite_weights_is_refused_by_the_loader(tmp_path, key):
    """Before: predict printed `c0 nan` for every image, accuracy 33.33%, loss nan, exit 0."""
    weights = AlexNet(num_classes=3, hidden=(8, 4)).state_dict()
    weights["classifier.6.bias"][1] = float("nan")
    weights["features.0.weight"][0, 0, 0, 0] = float("inf")
    healthy = AlexNet(num_classes=3, hidden=(8, 4)).state_dict()
    checkpoint = {"model": healthy, "ema": None, "model_args": {"num_classes": 3, "hidden": (8, 4)},
                  "classes": ["a", "b", "c"], "image_size": 64, "stored_size": 64} | {key: weights}
    save_checkpoint(checkpoint, tmp_path / "x.pt")
    kind = "EMA weights" if key == "ema" else "weights"
    with pytest.raises(CheckpointError, match=rf"x\.pt: its {kind} hold NaN or infinite values \(features\.0\.weight, "
                                              r"classifier\.6\.bias\): the training that wrote them diverged"):
        load_checkpoint(tmp_path / "x.pt")
    save_checkpoint(checkpoint | {key: healthy}, tmp_path / "x.pt")
    load_checkpoint(tmp_path / "x.pt")


def test_the_ema_is_torchs_averaged_model_bit_for_bit():
    torch.manual_seed(0)
    model = AlexNet(num_classes=3, hidden=(8, 4))
    ours, torchs = EMA(model, 0.9), AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ours.update_parameters(model)
        torchs.update_parameters(model)
    a, b = ours.state_dict(), torchs.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a) and int(a["n_averaged"]) == 3


def test_an_ema_update_copies_nothing_from_the_host_to_the_device():
    """AveragedModel copied its step count (a CPU tensor) to the device at every update: on CUDA a blocking copy, the
    host waiting for all the GPU had queued, each step. The meta device stands for the GPU here."""
    class HostToDevice(TorchDispatchMode):
        copies = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            given, made = (pytree.tree_leaves(x) for x in ((args, kwargs), out))
            HostToDevice.copies += any(getattr(t, "device", None) == torch.device("cpu") for t in given) and any(
                getattr(t, "is_meta", False) for t in made)
            return out
    model = AlexNet(num_classes=3, hidden=(8, 4)).to("meta")
    for ema in (EMA(model, 0.9), AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))):
        HostToDevice.copies = 0
        with HostToDevice():
            for _ in range(3):
                ema.update_parameters(model)
        assert HostToDevice.copies == (0 if isinstance(ema, EMA) else 2)  # torch's: at each update but the first
