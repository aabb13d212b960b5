"""The files travel: model.py alone, and model.py + cli.py + data.py + predict.py, work in an empty folder."""
import ast
import csv
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

import data
import predict
from conftest import ROOT
from model import model_from_checkpoint


def python_in(folder, code: str) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter whose only project files are those in `folder`."""
    return subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(folder)})


@pytest.mark.slow  # a new interpreter is what is tested
def test_model_py_alone_rebuilds_a_checkpoint_and_imports_only_torch(pretrained, tmp_path):
    shutil.copy(ROOT / "model.py", tmp_path)
    result = python_in(tmp_path, f"""
import sys
import model
checkpoint = model.load_checkpoint({str(pretrained)!r})
net = model.model_from_checkpoint(checkpoint)
print(type(net).__name__, checkpoint["classes"], sum(p.numel() for p in net.parameters()))
print(sorted(name for name in ("torchvision", "PIL", "data", "predict", "pretrain") if name in sys.modules))
""")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["AlexNet ['blue', 'green', 'red'] 3061763", "[]"]  # 64, 32 wide


def test_a_checkpoints_own_keys_give_its_evaluation_with_torch_alone(pretrained, tiny_data):
    """model.py's recipe for a checkpoint's input, done with torch's interpolate from the keys the checkpoint holds,
    gives predict's logits. Before: it held mean and std, but not the resize before the centre crop (256/224)."""
    checkpoint = torch.load(pretrained, weights_only=True)
    size, images = checkpoint["image_size"], data.load_folder(tiny_data / "test", size=checkpoint["stored_size"]).images
    resized = int(size * checkpoint["eval_resize"])
    at = round((resized - size) / 2)
    x = torch.nn.functional.interpolate(images / 255, size=(resized, resized), mode="bilinear")
    x = x[..., at:at + size, at:at + size]
    x = (x - torch.tensor(checkpoint["mean"]).view(3, 1, 1)) / torch.tensor(checkpoint["std"]).view(3, 1, 1)
    model = model_from_checkpoint(checkpoint).eval()
    with torch.no_grad():
        ours = model(x) / checkpoint["temperature"]
        assert torch.allclose(ours, predict.logits_of(model, images, **predict.evaluation_of(checkpoint)), atol=1e-5)
    assert checkpoint["stored_size"] < resized  # enlarged: interpolate's bilinear is the evaluation's (not shrunk)
    recipe = sys.modules[model_from_checkpoint.__module__].__doc__  # a reuser's document: the keys used above
    assert all(key in recipe for key in ("stored_size", "eval_resize", "image_size", "mean", "std", "temperature"))


def test_model_py_names_no_flag_or_script_of_ours():
    source = (ROOT / "model.py").read_text()
    assert not re.findall(r"--[a-z]", source) and not re.findall(r"\b(pretrain|finetune|predict|data)\.py", source)


@pytest.mark.slow  # a new interpreter is what is tested
def test_predict_with_model_cli_and_data_alone_in_an_empty_folder(pretrained, tiny_data, tmp_path):
    for name in ("model.py", "cli.py", "data.py", "predict.py"):
        shutil.copy(ROOT / name, tmp_path)
    image = next((tiny_data / "test" / "red").iterdir())
    result = subprocess.run([sys.executable, "predict.py", str(image), "--checkpoint", str(pretrained), "--device",
                             "cpu"], cwd=tmp_path, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    path, label, probability = result.stdout.strip().split("\t")
    assert path == str(image) and label in ("blue", "green", "red") and 0 < float(probability) <= 1


@pytest.mark.slow  # a new interpreter is what is tested
def test_importing_predict_loads_no_trainer_and_no_script_loads_torchvision(tmp_path):
    """torchvision's import costs about as much as torch's (it imports torch._dynamo): a second at every start."""
    result = python_in(ROOT, """
import sys
import torch
before = set(sys.modules)
import predict
added = set(sys.modules) - before
print(sorted(name for name in added if name in ("pretrain", "finetune") or name.startswith("torch.distributed")))
import download, export, finetune, pretrain
print(sorted(name for name in sys.modules if name.startswith("torchvision")))
""")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[]", "[]"]


def test_a_run_records_the_code_that_made_it(pretrained):
    """Provenance: the checkpoint, each row of the log (with torch's version) and the test report name the commit of
    this checkout. The log is plain CSV: its first line is its header (a comment line there was read as the header)."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    code = torch.load(pretrained, weights_only=True)["code"]
    assert re.fullmatch(rf"commit {head.stdout.strip()}(-dirty)?", code)
    with open(pretrained.with_suffix(".csv"), newline="") as log:
        rows = list(csv.DictReader(log))
    assert [(row["epoch"], row["code"], row["torch"]) for row in rows] == [("1", code, torch.__version__),
                                                                           ("2", code, torch.__version__)]
    assert json.loads(pretrained.with_suffix(".test.json").read_text())["code"] == code


@pytest.mark.slow  # a new interpreter is what is tested
def test_outside_a_checkout_the_code_is_a_hash_of_the_scripts(tmp_path):
    versions = []
    for change in ("", "# a changed script\n"):
        for name in ("model.py", "cli.py", "data.py", "predict.py", "pretrain.py"):
            shutil.copy(ROOT / name, tmp_path)
        with open(tmp_path / "model.py", "a") as f:
            f.write(change)
        result = python_in(tmp_path, "import cli; print(cli.code_version())")
        assert result.returncode == 0, result.stderr
        versions.append(result.stdout.strip())
    assert all(re.fullmatch(r"scripts sha256 [0-9a-f]{12}", v) for v in versions) and versions[0] != versions[1]


# Which of the project's scripts each may import: dependencies point one way (the shared plumbing above the model's
# error type, data above the plumbing, download and predict above data, training above predict, tasks.py reading the
# scripts' parsers), so no circle forms and predict.py never needs a trainer.
ALLOWED_IMPORTS = {"model.py": set(), "cli.py": {"model"}, "data.py": {"cli"}, "download.py": {"cli", "data"},
                   "predict.py": {"model", "cli", "data"}, "pretrain.py": {"model", "cli", "data", "predict"},
                   "finetune.py": {"model", "cli", "data", "predict", "pretrain"},
                   "export.py": {"model", "cli", "data", "predict"},
                   "tasks.py": {"cli", "download", "pretrain", "finetune", "predict", "export"}}


@pytest.mark.parametrize("script", sorted(ALLOWED_IMPORTS))
def test_scripts_import_only_the_scripts_below_them(script):
    scripts = {path.stem for path in ROOT.glob("*.py")}
    tree = ast.parse((ROOT / script).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names} | {node.module.split(".")[0] for node in ast.walk(tree)
                                            if isinstance(node, ast.ImportFrom) and node.module}
    assert imported & scripts <= ALLOWED_IMPORTS[script]


def test_every_script_has_its_place_in_the_house():
    assert {path.name for path in ROOT.glob("*.py")} == set(ALLOWED_IMPORTS)
