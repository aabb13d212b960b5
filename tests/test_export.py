import copy
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import data
import export
import predict
from conftest import ROOT, error_line, run
from model import model_from_checkpoint


@pytest.fixture(scope="module")
def varied(pretrained, tiny_data, tmp_path_factory) -> str:
    """The tests' checkpoint with its head's bias moved by the mean logit of the test images: the briefly trained
    model calls every image the same class, which would hide a mix-up of images; this one tells them apart."""
    checkpoint = torch.load(pretrained, weights_only=True)
    test = data.load_folder(tiny_data / "test", size=checkpoint["stored_size"])
    logits = predict.compute_logits(model_from_checkpoint(checkpoint), [test.images], checkpoint["image_size"])
    checkpoint["model"]["classifier.6.bias"] -= logits.mean(0)
    path = tmp_path_factory.mktemp("varied") / "varied.pt"
    torch.save(checkpoint, path)
    return str(path)


@pytest.fixture(scope="module")
def program(varied, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("program") / "model.pt2"
    result = run("export.py", "--checkpoint", varied, "--out", out, "--data-dir", tiny_data)
    return out, result


def predicted(result) -> list[dict]:
    return json.loads(result.stdout)["predictions"]


def readme_snippet() -> str:
    """README's lines that load the program with Pillow."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"\n((?:    .*\n)*    .*torch\.export\.load.*\n(?:    .*\n)*)", readme)[1]
    return "".join(line[4:] + "\n" for line in block.splitlines())


def test_export_checks_the_program_and_writes_its_record(program, varied, tiny_data):
    out, result = program
    record = json.loads(out.with_name("model.pt2.json").read_text())
    assert record["check"]["images"] == 18 and record["check"]["top1_agreement"] == 1.0
    assert record["check"]["max_probability_difference"] < export.TOLERANCE
    assert record["checkpoint"] == varied and record["classes"] == ["blue", "green", "red"]
    assert record["input"] == "N x 3 x 32 x 32 uint8" and record["mean"] == [0.485, 0.456, 0.406]
    evaluation = ("image_size", "tta", "eval_resize", "temperature")  # the checkpoint's own (row 266)
    checkpoint = torch.load(varied, weights_only=True)
    assert [record[key] for key in evaluation] == [checkpoint[key] for key in evaluation]
    assert "top-1 agreement 100.00%" in result.stdout and "test split" in result.stdout


def test_the_check_shows_its_progress(varied, tiny_data, tmp_path):
    """Before: export.py said nothing while it checked the program (CIFAR-10's test split: 85 s on 2 CPU cores)."""
    result = run("export.py", "--checkpoint", varied, "--out", tmp_path / "model.pt2", "--data-dir", tiny_data,
                 "--batch-size", "4")
    assert "  check: 4/18 images" in result.stderr and "check:" not in result.stdout


@pytest.mark.slow  # a real Python process without the project on its path
def test_the_program_runs_without_the_project_as_predict_does_at_batch_1_and_7(program, varied, tiny_data, tmp_path):
    out, _ = program
    images = sorted((tiny_data / "test").rglob("*.png"))[::2][:7]
    for name in ("model.pt2", "model.pt2.json"):
        os.symlink(out.with_name(name), tmp_path / name)
    script = readme_snippet()
    assert len(script.strip().splitlines()) <= 10
    # -I: neither the working folder nor PYTHONPATH on sys.path; the script checks no project file is importable
    # and torchvision not importable: the program's crop is torch's own
    check = ("import importlib.util, sys; assert not any(importlib.util.find_spec(m) for m in ('model', 'data'))\n"
             "sys.modules['torchvision'] = None\n")
    # the snippet as a script of its own at batch 7, then at batch 1, in one interpreter (one start of torch)
    batches = [list(map(str, images)), list(map(str, images[:1]))]
    runs = f"for sys.argv[1:] in {batches!r}:\n    exec({script!r}, {{}})\n"
    result = subprocess.run([sys.executable, "-I", "-c", check + runs], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    printed = [line.split() for line in result.stdout.splitlines()]
    lines = {7: printed[:7], 1: printed[7:]}
    expected = predicted(run("predict.py", *images, "--checkpoint", varied, "--device", "cpu", "--json"))
    assert len({p["top"][0]["label"] for p in expected}) > 1  # a test that a mix-up of images would fail
    assert [(path, label) for path, label, _ in lines[7]] == [(p["path"], p["top"][0]["label"]) for p in expected]
    assert all(abs(float(line[2]) - p["top"][0]["probability"]) < 1e-3 for line, p in zip(lines[7], expected))
    assert lines[1] == lines[7][:1]


def test_the_programs_probabilities_are_plain_tensors(program):
    """Before: they required grad (the program's weights were trainable): each call kept the batch's autograd graph,
    and `.numpy()` raised "Can't call numpy() on Tensor that requires grad"."""
    out, _ = program
    probabilities = torch.export.load(out).module()(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert not probabilities.requires_grad and probabilities.numpy().shape == (2, 3)


def test_predict_with_the_program_gives_the_checkpoints_output(program, varied, tiny_data):
    out, _ = program
    from_program, from_checkpoint = (
        json.loads(run("predict.py", tiny_data / "test", "--checkpoint", path, "--device", "cpu", "--json",
                       "--topk", "3").stdout) for path in (out, varied))
    for ours, theirs in zip(from_program["predictions"], from_checkpoint["predictions"], strict=True):
        assert [t["label"] for t in ours["top"]] == [t["label"] for t in theirs["top"]]
        assert all(abs(a["probability"] - b["probability"]) < 1e-5 for a, b in zip(ours["top"], theirs["top"]))
    assert from_program["report"]["accuracy"] == from_checkpoint["report"]["accuracy"]


@pytest.mark.slow  # a new interpreter: torch's warning is logged to the stderr it started with
def test_a_program_named_without_pt2_loads_without_torchs_warning(program, tiny_data, tmp_path):
    """Before: torch logged "Unable to load package. f must be a buffer or a file ending in .pt2" (an error to be)."""
    out, _ = program
    shutil.copy(out, tmp_path / "model.bin")
    result = run("predict.py", tiny_data / "test", "--checkpoint", tmp_path / "model.bin", "--device", "cpu",
                 process=True)
    assert "pt2" not in result.stderr and len(result.stdout.splitlines()) > 18, result.stderr


def test_what_the_scripts_write_by_default_is_never_committed():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    written = ["model.pt2", "model.pt2.json", "checkpoints/pretrain.pt", "data/cifar10/test/cat/1.png", "runs/a.pt"]
    ignored = subprocess.run(["git", "check-ignore", *written], cwd=ROOT, capture_output=True, text=True).stdout
    assert ignored.split() == written


@pytest.mark.parametrize("trained_in", ["here", "another machine"])
def test_the_checkpoints_relative_data_folder_is_found_from_another_folder(varied, tiny_data, tmp_path, trained_in):
    """In the folder its training ran in, as a resume finds it; one copied from elsewhere, in the same layout here."""
    checkpoint = torch.load(varied, weights_only=True)
    elsewhere = trained_in == "another machine"
    checkpoint["args"]["data_dir"] = tiny_data.name  # as `--data-dir data`, run in the folder above it or elsewhere
    checkpoint["cwd"] = "/home/gpu/project" if elsewhere else str(tiny_data.parent)
    torch.save(checkpoint, tmp_path / "relative.pt")
    result = run("export.py", "--checkpoint", tmp_path / "relative.pt", "--out", tmp_path / "r.pt2", "--limit", "4",
                 cwd=tiny_data.parent if elsewhere else tmp_path)
    assert f"on 4 images (the test split of {tiny_data.name if elsewhere else tiny_data})" in result.stdout


def test_the_program_divides_by_the_checkpoints_temperature(varied, tmp_path):
    """Its data folder gone (a checkpoint copied to another machine), the check runs on generated images."""
    checkpoint = torch.load(varied, weights_only=True) | {"temperature": 3.0}
    checkpoint["args"]["data_dir"] = str(tmp_path / "gone")
    torch.save(checkpoint, tmp_path / "warm.pt")
    result = run("export.py", "--checkpoint", tmp_path / "warm.pt", "--out", tmp_path / "warm.pt2", "--limit", "8")
    assert "on 8 images (generated images (no test split found; pass --data-dir for real ones))" in result.stdout
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        probabilities = torch.export.load(tmp_path / "warm.pt2").module()(images)
        eager = export.Deployed(checkpoint, "warm.pt")
        expected = torch.softmax(eager.model(export.data.eval_batch(images, 64)) / 3.0, 1)
    assert torch.allclose(probabilities, expected, atol=1e-6)


@pytest.mark.parametrize("change", ["bias", "scale"])
def test_an_altered_program_fails_the_check_and_nothing_is_written(varied, tmp_path, monkeypatch, change):
    def altered(module, *args):
        changed = copy.deepcopy(module)  # the program's weights, not the checkpoint's
        with torch.no_grad():
            if change == "bias":  # a small, real change of one weight
                changed.model.classifier[6].bias[1] += 0.01
            else:  # every logit times 10: no top-1 class changes, only the probabilities (the TOLERANCE check)
                changed.model.classifier[6].weight *= 10
                changed.model.classifier[6].bias *= 10
        return export_program(changed, *args)

    export_program = export.export_program
    monkeypatch.setattr(export, "export_program", altered)
    result = run("export.py", "--checkpoint", varied, "--out", tmp_path / "m.pt2", "--limit", "8", check=False)
    assert "the exported program differs from the checkpoint" in error_line(result)
    assert "largest probability difference" in result.stdout and list(tmp_path.iterdir()) == []
    if change == "scale":
        assert "top-1 agreement 100.00%" in result.stdout


def test_bad_inputs_are_one_line_and_write_nothing(program, varied, tmp_path, monkeypatch):
    out, _ = program
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "notes.json").write_text('{"mine": 1}')  # before: replaced by the record without a word
    (tmp_path / "r.pt2.json").mkdir()
    checkpoint = tmp_path / "c.pt"  # a copy: a regression would overwrite the module's checkpoint
    shutil.copy(varied, checkpoint)
    cases = {  # before: --out the checkpoint replaced it, a folder as the record was a traceback after the export,
        # --data-dir a test/ folder was "test/test: no such folder"
        ("--checkpoint", tmp_path / "notes.txt"): "not a checkpoint file",
        ("--checkpoint", out): "an exported program (export.py), not a checkpoint; pass the checkpoint it was",
        ("--out", tmp_path / "missing" / "m.pt2"): "missing does not exist; create it or choose another --out",
        ("--out", checkpoint): f"--out {checkpoint}: exists and is no exported program (a checkpoint?), which "
                               "writing would replace; choose another --out, or remove the file",
        ("--out", tmp_path / "r.pt2"): f"its record {tmp_path / 'r.pt2.json'} would replace what is there, which is "
                                       "no record of a program at --out",
        ("--out", tmp_path / "notes"): f"its record {tmp_path / 'notes.json'} would replace what is there",  # a file
        ("--out", tmp_path / "m.bin"): f"--out {tmp_path / 'm.bin'}: a program file's name ends in .pt2 (torch."
                                       f"export.load warns of any other, and is to refuse it); choose e.g. --out "
                                       f"{tmp_path / 'm.pt2'}",  # before: written, "Unable to load package" at load
        ("--data-dir", tmp_path): f"--data-dir {tmp_path}: holds no test/ folder; pass the data folder whose test/ "
                                  "holds the class folders",
    }
    with monkeypatch.context() as patch:  # each told before the work: the export
        patch.setattr(export, "export_program", lambda *args: pytest.fail("exported before the bad input was told"))
        for (flag, value), expected in cases.items():
            argv = {"--checkpoint": varied, "--out": tmp_path / "m.pt2", "--limit": "4"} | {flag: value}
            result = run("export.py", *[word for pair in argv.items() for word in pair], check=False)
            assert expected in error_line(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "notes.json", "notes.txt", "r.pt2.json"]
    assert (tmp_path / "notes.json").read_text() == '{"mine": 1}'
    shutil.copy(out, tmp_path / "again.pt2")  # a program and its own record are replaced by the next export
    (tmp_path / "again.pt2.json").write_text('{"mine": 1}')  # not a record: a user's file beside a program
    result = run("export.py", "--checkpoint", varied, "--out", tmp_path / "again.pt2", "--limit", "4", check=False)
    assert "its record" in error_line(result) and (tmp_path / "again.pt2.json").read_text() == '{"mine": 1}'
    shutil.copy(f"{out}.json", tmp_path / "again.pt2.json")
    run("export.py", "--checkpoint", varied, "--out", tmp_path / "again.pt2", "--limit", "4")
    assert json.loads((tmp_path / "again.pt2.json").read_text())["check"]["images"] == 4
    assert checkpoint.read_bytes() == Path(varied).read_bytes()
    result = run("finetune.py", "--checkpoint", out, "--data-dir", tmp_path, "--out", tmp_path / "f.pt", check=False)
    assert "an exported program (export.py), not a checkpoint" in error_line(result)


@pytest.mark.slow  # a new interpreter: this one has torchvision imported
def test_a_program_exported_with_torchvisions_crop_still_predicts(varied, tiny_data, tmp_path, monkeypatch):
    """Programs exported before the crop was torch's own call torchvision's roi_align, which is registered only by
    importing torchvision: predict.py, which no longer imports it, does so for them."""
    from torchvision.ops import roi_align

    def torchvision_crop(images, boxes, size):  # the crop as it was (given a box for each image, as eval_batch was)
        index = torch.arange(images.shape[0], device=images.device, dtype=boxes.dtype).unsqueeze(1)
        return roi_align(images.float(), torch.cat([index, boxes.expand(images.shape[0], 4)], 1), size, 1.0, -1, True)

    monkeypatch.setattr(data, "crop_resize", torchvision_crop)
    run("export.py", "--checkpoint", varied, "--out", tmp_path / "old.pt2", "--limit", "8")
    assert b"torchvision" in (tmp_path / "old.pt2").read_bytes()
    result = run("predict.py", tiny_data / "test", "--checkpoint", tmp_path / "old.pt2", "--device", "cpu",
                 "--json", process=True, check=False)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["predictions"]) == len(list((tiny_data / "test").rglob("*.png")))


def test_a_damaged_program_given_to_predict_is_one_line(tiny_data, tmp_path):
    with zipfile.ZipFile(tmp_path / "m.pt2", "w") as archive:  # a program's marker, and nothing a program needs
        archive.writestr("m/archive_format", "pt2")
    result = run("predict.py", tiny_data / "test", "--checkpoint", tmp_path / "m.pt2", "--device", "cpu", check=False)
    assert error_line(result) == (f"predict.py: {tmp_path / 'm.pt2'}: an exported program that cannot be loaded "
                                  "(damaged, or without export.json: not written by export.py); export it again")


def test_latency_refuses_a_checkpoint_as_its_program(varied, monkeypatch):
    monkeypatch.syspath_prepend(ROOT / "benchmarks")  # latency.py's folder, which a process of it has on its path
    result = run("benchmarks/latency.py", "--checkpoint", varied, "--program", varied, check=False)
    assert error_line(result) == (f"latency.py: {varied}: not an exported program; pass a file export.py wrote, or "
                                  f"export this checkpoint first: python export.py --checkpoint {varied}")


def test_latency_refuses_a_program_exported_from_another_checkpoint(program, varied, pretrained, tmp_path,
                                                                     monkeypatch, capsys):
    """Before: another checkpoint's program was timed as --checkpoint's, silently; one of another stored size failed
    in its first call with a traceback (a shape guard's AssertionError)."""
    monkeypatch.syspath_prepend(ROOT / "benchmarks")
    import latency
    resized = torch.load(varied, weights_only=True) | {"stored_size": 24}
    torch.save(resized, tmp_path / "resized.pt")
    for checkpoint, differ in ((pretrained, "probabilities"), (tmp_path / "resized.pt", "stored_size")):
        with pytest.raises(SystemExit) as stopped:
            latency.main(["--checkpoint", str(checkpoint), "--program", str(program[0]), "--runs", "1",
                          "--batch-runs", "1", "--warmup", "1", "--batch-size", "2"])
        assert stopped.value.code == (f"latency.py: --program {program[0]}: not exported from --checkpoint "
                                      f"{checkpoint} (the {differ} differ; it was exported from {varied}); pass the "
                                      "program exported from it, or leave out --program to export it here")
    assert capsys.readouterr().out == ""  # refused before the table's first line


def test_latency_checks_a_program_exported_for_cuda_on_the_cpu_as_its_eager_model(program, varied, monkeypatch):
    """A program exported with --device cuda holds CUDA tensors: run as loaded on the CPU's images, its check was a
    device-mismatch traceback. It is moved to the CPU first, as the timing moves it (test_cuda runs it for real)."""
    monkeypatch.syspath_prepend(ROOT / "benchmarks")
    import latency
    moved, move = [], latency.move_to_device_pass
    monkeypatch.setattr(latency, "move_to_device_pass", lambda p, device: moved.append(device) or move(p, device))
    checkpoint = torch.load(varied, weights_only=True)
    loaded, record = predict.load_program(str(program[0]))
    args = latency.build_parser().parse_args(["--checkpoint", varied, "--program", str(program[0])])
    latency.check_program(loaded, record, export.Deployed(checkpoint, varied), checkpoint, args)
    assert moved == [torch.device("cpu")]


def test_a_record_that_cannot_be_written_leaves_no_record_of_another_program(tmp_path, monkeypatch):
    out, record = tmp_path / "m.pt2", tmp_path / "m.pt2.json"
    record.write_text('{"check": "of the previous program"}')
    write_atomically = export.cli.write_atomically

    def full_for_the_record(path, write):
        if Path(path) == record:
            raise OSError(28, "No space left on device")
        write_atomically(path, write)
    monkeypatch.setattr(export.cli, "write_atomically", full_for_the_record)
    with pytest.raises(export.cli.UsageError, match=f"--out {out}: written, but not its record {record} \\(No space"):
        export.write_program(out, b"the program", {"check": "of this one"})
    assert out.read_bytes() == b"the program" and not record.exists()


def test_a_program_onto_a_full_disk_is_one_line_and_leaves_nothing(varied, small_filesystem):
    full = small_filesystem(size="4m")  # the program is about 12 MB (QUICK's widths)
    result = run("export.py", "--checkpoint", varied, "--out", full / "m.pt2", "--limit", "4", check=False)
    assert error_line(result) == (f"export.py: --out {full / 'm.pt2'}: cannot write (No space left on device); free "
                                  "space or choose another path")
    assert list(full.iterdir()) == []
