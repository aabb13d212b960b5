import os

import pytest
import torch
import torchvision

from model import AlexNet, CheckpointError, load_checkpoint, load_matching, model_from_checkpoint
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


@pytest.mark.parametrize("size", [63, 96, 224])
def test_output_shape(size):
    assert AlexNet(num_classes=7)(torch.randn(2, 3, size, size)).shape == (2, 7)


def test_smallest_input_that_fails():
    with pytest.raises(RuntimeError):
        AlexNet()(torch.randn(1, 3, 62, 62))


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
    model = AlexNet(num_classes=3)
    path = tmp_path / "c.pt"
    save_checkpoint({"model": model.state_dict(), "model_args": {"num_classes": 3, "dropout": 0.5},
                     "classes": ["a", "b", "c"], "image_size": 64, "stored_size": 32}, path)
    torch.load(path, weights_only=True)
    rebuilt = model_from_checkpoint(load_checkpoint(path))
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
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        load_checkpoint(path)
    assert not RunsCode.marker.exists()


def test_checkpoint_of_another_class_count_is_a_clear_error(tmp_path):
    checkpoint = {"model": AlexNet(num_classes=5).state_dict(), "model_args": {"num_classes": 10, "dropout": 0.5}}
    with pytest.raises(CheckpointError, match=r"do not fit AlexNet.*classifier\.6"):
        model_from_checkpoint(checkpoint, "x.pt")


def test_a_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(AlexNet().state_dict(), path)
    with pytest.raises(CheckpointError, match="not a checkpoint of this project"):
        load_checkpoint(path)
    (tmp_path / "truncated.pt").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated.pt: not a loadable checkpoint"):
        load_checkpoint(tmp_path / "truncated.pt")


def test_background_writer_saves_the_state_at_the_call(tmp_path, monkeypatch):
    import threading

    from pretrain import CheckpointWriter
    release = threading.Event()
    real_save = torch.save

    def slow_save(obj, f):
        release.wait(10)
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", slow_save)
    weights = torch.zeros(4)
    with CheckpointWriter() as writer:
        writer.save({"w": weights}, tmp_path / "c.pt")
        assert not (tmp_path / "c.pt").exists()  # save returned while the write waits
        weights += 1  # training goes on changing the tensor
        release.set()
    assert torch.equal(torch.load(tmp_path / "c.pt", weights_only=True)["w"], torch.zeros(4))


def test_background_writer_raises_a_failed_write(tmp_path, monkeypatch):
    from pretrain import CheckpointWriter
    save_checkpoint({"version": 1}, tmp_path / "c.pt")

    def disk_full(obj, f):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    writer = CheckpointWriter()
    writer.save({"version": 2}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="No space left on device"):
        writer.wait()
    assert torch.load(tmp_path / "c.pt", weights_only=True) == {"version": 1}
