"""invoke tasks: each runs one of the scripts; `invoke --list`, `invoke --help TASK`.

    invoke all                     # download, pretrain, finetune, predict: the whole job
    invoke all --epochs 3 --limit 4000 --image-size 64 --batch-size 64 --lr 0.03 --source ../shared/data/cifar10-jpg.tar.gz
"""
import shlex
import sys
from pathlib import Path

from invoke import task

PYTHON = shlex.quote(sys.executable)
HERE = str(Path(__file__).resolve().parent)

TRAIN_HELP = {
    "data_dir": "folder with train/<class>/ and test/<class>/ (default data/cifar10)",
    "out_dir": "folder for checkpoints, logs and the prediction grid (default checkpoints)",
    "epochs": "epochs per stage (default 40)",
    "batch_size": "images per step (default 256)",
    "lr": "SGD learning rate (default 0.01)",
    "image_size": "network input side in px (default 224)",
    "limit": "use only this many training images: quick runs",
    "device": "cuda, cpu ... (default: cuda if available)",
    "seed": "random seed (default 0)",
}


def flags(**options) -> str:
    """--name value for every option that was given, quoted for the shell; --name alone for a switch that is on."""
    return "".join(f" --{name.replace('_', '-')}" + ("" if value is True else f" {shlex.quote(str(value))}")
                   for name, value in options.items() if value is not None and value is not False)


def script(c, name: str, arguments: str) -> None:
    with c.cd(HERE):
        c.run(f"{PYTHON} {name}{arguments}", echo=True, pty=False)


@task(help={"root": "folder to create (default data/cifar10)", "source": "URL, archive or folder instead of the official download",
            "md5": "expected md5 of --source"})
def download(c, root=None, source=None, md5=None):
    """Download CIFAR-10 into train/ and test/ class folders (skipped when present)."""
    script(c, "data.py download", flags(root=root, source=source, md5=md5))


@task(help=TRAIN_HELP | {"resume": "continue the run that left this .last.pt"})
def pretrain(c, data_dir=None, out_dir="checkpoints", epochs=None, batch_size=None, lr=None, image_size=None, limit=None,
             device=None, seed=None, resume=None):
    """Train AlexNet from scratch."""
    script(c, "pretrain.py", flags(data_dir=data_dir, out=f"{out_dir}/pretrain.pt", epochs=epochs, batch_size=batch_size,
                                   lr=lr, image_size=image_size, limit=limit, device=device, seed=seed, resume=resume))


@task(help=TRAIN_HELP | {"mode": "head, classifier or full (default head)", "resume": "continue the run that left this .last.pt",
                         "new_head": "a fresh last layer even for the checkpoint's classes (the reference)"})
def finetune(c, data_dir=None, out_dir="checkpoints", epochs=None, batch_size=None, lr=None, image_size=None, limit=None,
             device=None, seed=None, mode=None, resume=None, new_head=False):
    """Fine-tune the pretrained model (--mode head: its last layer only)."""
    script(c, "finetune.py", flags(data_dir=data_dir, out=f"{out_dir}/finetune.pt", checkpoint=f"{out_dir}/pretrain.pt",
                                   epochs=epochs, batch_size=batch_size, lr=lr, image_size=image_size, limit=limit,
                                   device=device, seed=seed, mode=mode, resume=resume, new_head=new_head))


@task(help={"paths": "image or folder (default data/cifar10/test)", "checkpoint": "default: checkpoints/finetune.pt, else pretrain.pt",
            "limit": "predict this many images (default 64)", "grid": "picture of the predictions (default checkpoints/predictions.png)",
            "device": TRAIN_HELP["device"]})
def predict(c, paths="data/cifar10/test", checkpoint=None, limit=64, grid="checkpoints/predictions.png", device=None):
    """Classify images and draw a grid of the predictions."""
    script(c, "predict.py " + shlex.quote(paths), flags(checkpoint=checkpoint, limit=limit, grid=grid, device=device))


@task(name="all", help=TRAIN_HELP | {"source": download.help["source"], "md5": download.help["md5"]})
def all_(c, data_dir="data/cifar10", out_dir="checkpoints", epochs=None, batch_size=None, lr=None, image_size=None,
        limit=None, device=None, seed=None, source=None, md5=None):
    """The whole job: download, pretrain, finetune, predict on test images."""
    training = dict(data_dir=data_dir, out_dir=out_dir, epochs=epochs, batch_size=batch_size, lr=lr, image_size=image_size,
                    limit=limit, device=device, seed=seed)
    download(c, root=data_dir, source=source, md5=md5)
    pretrain(c, **training)
    finetune(c, **training)
    predict(c, paths=f"{data_dir}/test", checkpoint=f"{out_dir}/finetune.pt", grid=f"{out_dir}/predictions.png", device=device)


@task(help={"data_dir": TRAIN_HELP["data_dir"], "image_size": TRAIN_HELP["image_size"], "batch_size": TRAIN_HELP["batch_size"],
            "device": TRAIN_HELP["device"], "steps": "timed training steps (default 50)", "compile": "torch.compile the model"})
def bench(c, data_dir=None, image_size=None, batch_size=None, device=None, steps=None, compile=False):
    """Training and evaluation images/s of this pipeline against the reference's."""
    script(c, "benchmarks/throughput.py", flags(data_dir=data_dir, image_size=image_size, batch_size=batch_size, device=device,
                                                steps=steps, compile=compile))


@task
def test(c):
    """Run the test suite."""
    with c.cd(HERE):
        c.run(f"{PYTHON} -m pytest", echo=True, pty=False)
