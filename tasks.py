r"""invoke tasks: each runs one of the scripts; `invoke --list`, `invoke --help TASK`.

    invoke all                     # download, pretrain, finetune, predict: the whole job
    invoke all --epochs 3 --limit 4000 --image-size 64 --batch-size 64 --lr 0.03 \
        --source ../shared/data/cifar10-jpg.tar.gz

A flag left out is left to the script, whose `--help` shows its default.
"""
import inspect
import shlex
import sys
from pathlib import Path

from invoke import Task, task

PYTHON = shlex.quote(sys.executable)
HERE = str(Path(__file__).resolve().parent)

TRAIN_HELP = {
    "data_dir": "folder with train/<class>/ and test/<class>/",
    "out_dir": "folder for checkpoints, logs and the prediction grid",
    "epochs": "epochs per stage",
    "batch_size": "images per step",
    "lr": "SGD learning rate",
    "image_size": "network input side in px",
    "limit": "use only this many training images: quick runs",
    "device": "where to run: cuda, cuda:1, cpu ...",
    "seed": "seeds the split, the initialisation and the augmentation",
}


def flags(**options) -> str:
    """--name value for every option that was given, quoted for the shell; --name alone for a switch that is on."""
    text = ""
    for name, value in options.items():
        if value is None or value is False:
            continue
        text += f" --{name.replace('_', '-')}"
        if value is not True:
            text += f" {shlex.quote(str(value))}"
    return text


def script(c, name: str, arguments: str) -> None:
    with c.cd(HERE):
        c.run(f"{PYTHON} {name}{arguments}", echo=True, pty=False)


def shows_defaults(t: Task) -> Task:
    """Append a task's own defaults (its signature's) to their help: invoke's --help does not show them."""
    for name, parameter in inspect.signature(t.body).parameters.items():
        if name in t.help and parameter.default not in (None, False, inspect.Parameter.empty):
            t.help[name] += f" (default {parameter.default})"
    return t


@task(help={
    "root": "folder to create, holding train/ and test/",
    "source": "URL, archive or folder instead of the official download",
    "md5": "expected md5 of --source",
})
def download(c, root=None, source=None, md5=None):
    """Download CIFAR-10 into train/ and test/ class folders (skipped when present)."""
    script(c, "download.py", flags(root=root, source=source, md5=md5))


@shows_defaults
@task(help=TRAIN_HELP | {"resume": "continue the run that left this .last.pt"})
def pretrain(c, data_dir=None, out_dir="checkpoints", epochs=None, batch_size=None, lr=None, image_size=None,
             limit=None, device=None, seed=None, resume=None):
    """Train AlexNet from scratch."""
    arguments = flags(data_dir=data_dir, out=f"{out_dir}/pretrain.pt", epochs=epochs, batch_size=batch_size,
                      lr=lr, image_size=image_size, limit=limit, device=device, seed=seed, resume=resume)
    script(c, "pretrain.py", arguments)


@shows_defaults
@task(help=TRAIN_HELP | {
    "mode": "which layers train: head, classifier or full",
    "resume": "continue the run that left this .last.pt",
    "new_head": "a fresh last layer even for the checkpoint's classes (the reference)",
})
def finetune(c, data_dir=None, out_dir="checkpoints", epochs=None, batch_size=None, lr=None, image_size=None,
             limit=None, device=None, seed=None, mode=None, resume=None, new_head=False):
    """Fine-tune the pretrained model (--mode head: its last layer only)."""
    arguments = flags(data_dir=data_dir, out=f"{out_dir}/finetune.pt", checkpoint=f"{out_dir}/pretrain.pt",
                      epochs=epochs, batch_size=batch_size, lr=lr, image_size=image_size, limit=limit,
                      device=device, seed=seed, mode=mode, resume=resume, new_head=new_head)
    script(c, "finetune.py", arguments)


@shows_defaults
@task(help={
    "paths": "image or folder",
    "checkpoint": "the trained model to classify with",
    "limit": "predict only this many images, a stratified sample",
    "grid": "where to draw the images with their predicted labels",
    "device": TRAIN_HELP["device"],
})
def predict(c, paths="data/cifar10/test", checkpoint=None, limit=64, grid="checkpoints/predictions.png", device=None):
    """Classify images and draw a grid of the predictions."""
    arguments = flags(checkpoint=checkpoint, limit=limit, grid=grid, device=device)
    script(c, "predict.py " + shlex.quote(paths), arguments)


@shows_defaults
@task(name="all", help=TRAIN_HELP | {"source": download.help["source"], "md5": download.help["md5"]})
def all_(c, data_dir="data/cifar10", out_dir="checkpoints", epochs=None, batch_size=None, lr=None, image_size=None,
         limit=None, device=None, seed=None, source=None, md5=None):
    """The whole job: download, pretrain, finetune, predict on test images."""
    training = dict(data_dir=data_dir, out_dir=out_dir, epochs=epochs, batch_size=batch_size, lr=lr,
                    image_size=image_size, limit=limit, device=device, seed=seed)
    download(c, root=data_dir, source=source, md5=md5)
    pretrain(c, **training)
    finetune(c, **training)
    predict(c, paths=f"{data_dir}/test", checkpoint=f"{out_dir}/finetune.pt", grid=f"{out_dir}/predictions.png",
            device=device)


@task(help={
    "data_dir": TRAIN_HELP["data_dir"],
    "image_size": TRAIN_HELP["image_size"],
    "batch_size": TRAIN_HELP["batch_size"],
    "device": TRAIN_HELP["device"],
    "steps": "timed training steps",
    "compile": "torch.compile the model",
})
def bench(c, data_dir=None, image_size=None, batch_size=None, device=None, steps=None, compile=False):
    """Training and evaluation images/s of this pipeline against the reference's."""
    arguments = flags(data_dir=data_dir, image_size=image_size, batch_size=batch_size, device=device, steps=steps,
                      compile=compile)
    script(c, "benchmarks/throughput.py", arguments)


@task(help={
    "out_dir": "folder for the steps' logs and results.md",
    "source": "the CIFAR-10 archive or folder (nothing is downloaded)",
    "minutes": "no step starts that would end after this many minutes",
    "rehearse": "the same steps on the CPU at toy scale",
})
def headline(c, out_dir="checkpoints/headline", source=None, minutes=None, rehearse=False):
    """Every headline figure on a GPU in one command: CUDA tests, throughput, the 40 + 40 job, recipes."""
    script(c, "benchmarks/headline.py", flags(out_dir=out_dir, source=source, minutes=minutes, rehearse=rehearse))


@task
def test(c):
    """Run the test suite."""
    with c.cd(HERE):
        c.run(f"{PYTHON} -m pytest", echo=True, pty=False)
