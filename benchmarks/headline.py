"""Every headline figure in one command: throughput, the whole 40 + 40 job, the CUDA tests, recipes; DIR/results.md.

    python benchmarks/headline.py --out-dir checkpoints/headline --source ../shared/data/cifar10-jpg.tar.gz --minutes 12
    python benchmarks/headline.py --out-dir /tmp/rehearsal --rehearse     # the same steps on the CPU, toy scale

The steps (see `plan`) run in order, the headline figures first (a lent GPU's minutes are few): the download;
benchmarks/throughput.py at 224 px, batch 256; the whole job, the commands `invoke all` chains (tasks.py) run
directly, each stage timed (the GPU machine has no invoke); tests/test_cuda.py; throughput.py's further entries of
THROUGHPUT_RUNS; benchmarks/latency.py on the job's checkpoint, eager against exported; then benchmarks/recipes.py
at 40 epochs, one recipe at a time, the most promising first, while time is left. Each step's
output goes to DIR/LOG.log as it runs, and DIR/results.md, one table of every figure with the device, torch version,
commit and each figure's command, is rewritten after each step: a run cut off keeps what it measured. A step starts
only when its estimate fits in what is left of --minutes (a training step's estimate uses the images/s measured by
then); one still running when the time is up gets SIGINT (a training run saves its resume state) and its partial
figures. SIGINT or SIGTERM to headline.py is passed to the step under way, whose row says it was stopped (with
what it measured), and it exits 128 + N. Data and checkpoints go to --work-dir, so DIR holds at most 8 files.

--rehearse runs the same steps on the CPU at toy scale: a generated data set of 10 classes, one epoch, a few steps,
a classifier 64 and 32 wide, tests/test_cuda.py all skipped. Its figures say only that the command works;
tests/test_headline.py runs it.
"""
import argparse
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from throughput import ROOT, describe

import cli  # noqa: E402
from cli import positive_float  # noqa: E402

SHARED_ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"

# benchmarks/throughput.py's runs, in order: (log name, its flags besides the scale's). One entry per run.
THROUGHPUT_RUNS = [
    ("throughput", []),
    ("throughput-compile", ["--compile"]),
    ("throughput-stream", ["--stream", "always"]),  # the streamed data path against the resident one, in one run
]

# benchmarks/recipes.py's recipes, the most promising first (benchmarks/README.md's reduced-scale ranking); the
# reference is the whole job's pretrain stage.
RECIPE_ORDER = ["crop-cosine-wd", "crop-cosine-wd-ls-ema-tta", "crop", "lr0.03", "crop-cutout"]

# A SIGINT'ed step that has not ended after this long is killed.
STOP_GRACE_S = 60


@dataclass
class Scale:
    """What differs between the GPU run and its rehearsal on the CPU; seconds are estimates."""
    device: str
    throughput: list[str]
    training: list[str]
    pretraining: list[str]  # pretrain.py's alone, for the job's pretrain stage and the recipes
    recipes: list[str]
    latency: list[str]  # benchmarks/latency.py's flags
    train_images: int  # training images of one epoch (45,000 of CIFAR-10's 50,000; the rest validate)
    epochs: int
    images_per_s: float  # assumed until a throughput run has measured it
    seconds: dict[str, float]


GPU = Scale("cuda", ["--image-size", "224", "--batch-size", "256"], [], [], RECIPE_ORDER, [], 45_000, 40, 10_000.0,
            {"cuda-tests": 180, "throughput": 90, "compile": 180, "download": 60, "training": 60, "predict": 30,
             "latency": 120})
REHEARSAL = Scale("cpu", ["--image-size", "64", "--batch-size", "8", "--steps", "2", "--reference-steps", "2",
                          "--warmup", "1"],
                  ["--epochs", "1", "--image-size", "64", "--batch-size", "16"], ["--hidden", "64,32"],
                  RECIPE_ORDER[:1],
                  ["--runs", "3", "--batch-runs", "1", "--warmup", "1", "--batch-size", "4"], 108, 1, 100.0,
                  {"cuda-tests": 20, "throughput": 20, "compile": 60, "download": 10, "training": 15, "predict": 10,
                   "latency": 30})


@dataclass
class Step:
    name: str
    log: str  # DIR/LOG.log; the job's stages share one log, the recipes another
    command: list[str]
    seconds: float  # the estimate, besides the training images
    images: int = 0  # training images it processes: their time is estimated from the measured images/s
    needs: str | None = None  # a step that must have succeeded first
    report: Path | None = None  # the .test.json it writes


# A run's checkpoints and reports, in --work-dir: the previous run's are removed first, so that a run is never refused
# for them ("exists already") and its rows show only what it measured; the data set is kept.
RUN_FOLDER = "run"


def plan(args: argparse.Namespace, scale: Scale, work: Path) -> list[Step]:
    """Every step of the run, in order; the job's download comes before throughput.py, which reads its images."""
    python, data_dir, ckpt = sys.executable, work / "cifar10", work / RUN_FOLDER / "checkpoints"
    device = ["--device", scale.device]
    training = ["--data-dir", str(data_dir), *scale.training, *device]
    epoch_images = scale.epochs * scale.train_images
    throughput = [Step(name, name, [python, "benchmarks/throughput.py", "--data-dir", str(data_dir),
                                    *scale.throughput, *flags, *device],
                       scale.seconds["compile" if "--compile" in flags else "throughput"], needs="download")
                  for name, flags in THROUGHPUT_RUNS]
    steps = [
        Step("download", "job", [python, "download.py", "--root", str(data_dir), "--source", str(args.source)],
             scale.seconds["download"]),
        throughput[0],  # its images/s make the training steps' estimates
        Step("pretrain", "job", [python, "pretrain.py", *training, *scale.pretraining,
                                 "--out", str(ckpt / "pretrain.pt")],
             scale.seconds["training"], epoch_images, "download", ckpt / "pretrain.test.json"),
        Step("finetune", "job", [python, "finetune.py", *training, "--out", str(ckpt / "finetune.pt"),
                                 "--checkpoint", str(ckpt / "pretrain.pt")],
             scale.seconds["training"], epoch_images, "pretrain", ckpt / "finetune.test.json"),
        Step("predict", "job", [python, "predict.py", str(data_dir / "test"), "--checkpoint", str(ckpt / "finetune.pt"),
                                "--limit", "64", "--grid", str(ckpt / "predictions.png"), *device],  # the task's
             scale.seconds["predict"], needs="finetune"),
        Step("cuda-tests", "cuda-tests", [python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-o",
                                          "addopts=", "tests/test_cuda.py"],  # one process: no pytest-xdist there
             scale.seconds["cuda-tests"]),
        *throughput[1:],
        Step("latency", "latency", [python, "benchmarks/latency.py", "--checkpoint", str(ckpt / "finetune.pt"),
                                    *scale.latency], scale.seconds["latency"], needs="finetune"),
    ]
    for recipe in scale.recipes:
        steps.append(Step(f"recipe {recipe}", "recipes",
                          [python, "benchmarks/recipes.py", "--recipe", recipe, "--out-dir",
                           str(work / RUN_FOLDER / "recipes"), *training, *scale.pretraining],
                          scale.seconds["training"], epoch_images, "download",
                          work / RUN_FOLDER / "recipes" / f"{recipe}.test.json"))
    return steps


# --------------------------------------------------------------------------- figures


def figures(step: Step, output: str) -> list[tuple[str, str]]:
    """(figure, value) pairs from a finished step's output and report."""
    found = []
    if step.log == "cuda-tests":
        summary = [line.strip("= ") for line in output.splitlines() if re.search(r" in [\d.]+s", line)]
        found.append(("tests/test_cuda.py", summary[-1] if summary else "no summary"))
    # throughput.py's tables: ours against the reference, then (--stream always) streamed against resident
    tables = re.split(r"^\s+streamed\s+resident.*$", output, maxsplit=1, flags=re.M)
    for table, compared in zip(tables, ("ours / reference", "streamed / resident")):
        for kind, first, second, ratio in re.findall(r"^(train|evaluate)\s+(\d+)\s+(\d+)\s+([\d.]+x)", table, re.M):
            name = "training" if kind == "train" else "evaluation"
            found.append((f"{name} images/s, {compared}", f"{first} / {second} = {ratio}"))
    # latency.py's rows: device, model, batch 1 median and p95 ms, images/s at its batch size
    for device, model, median, p95, rate in re.findall(r"^\| (cpu|cuda) \| (\w+) \| ([\d.]+) \| ([\d.]+) \| (\d+) \|",
                                                       output, re.M):
        found.append((f"{device} {model}: batch 1 median / p95 ms, batch images/s", f"{median} / {p95}, {rate}"))
    accuracy = re.findall(r"labelled images: accuracy ([\d.]+ %|[\d.]+%)", output)
    if accuracy:
        found.append(("accuracy of the predicted images", accuracy[-1]))
    if step.report is not None and step.report.exists():
        report = json.loads(step.report.read_text())
        found.append(("best validation accuracy (epoch)", f"{report['val_acc']:.2%} ({report['epoch']})"))
        found.append(("test accuracy, once, best validation epoch", f"{report['accuracy']:.2%}"))
    return found


def shown_command(command: list[str]) -> str:
    """The command as a reader runs it from the repository root."""
    shown = ["python" if word == sys.executable else word for word in command]
    return "`" + shlex.join(shown).replace(str(ROOT) + os.sep, "") + "`"


def write_results(out_dir: Path, header: str, rows: list[tuple[str, str, str, str]]) -> None:
    table = ["| step | wall time | figures | command |", "| --- | --- | --- | --- |"]
    table += [f"| {step} | {wall} | {found} | {command} |" for step, wall, found, command in rows]
    text = f"# Headline figures\n\n{header}\n\n" + "\n".join(table) + "\n"
    cli.write_atomically(out_dir / "results.md", lambda f: f.write(text.encode()))


# --------------------------------------------------------------------------- running the steps


class Stopped(Exception):
    """headline.py was sent a stop signal: the step under way is sent it too, and its row says so."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signal = signal.Signals(signum)


def raise_stopped(signum: int, frame) -> None:
    """Once: a second signal (Ctrl-C pressed again) is ignored while the step stops, within STOP_GRACE_S, so that
    its row and its log's last line are still written."""
    for sig in cli.stop_signals():
        signal.signal(sig, signal.SIG_IGN)
    raise Stopped(signum)


def run_step(step: Step, out_dir: Path, seconds_left: float) -> tuple[int, float, str, signal.Signals | None]:
    """The step, its output appended to its log; SIGINT to it when the time is up, and the signal that stops
    headline.py (pretrain.py saves its resume state at either, a Python script dies quietly at SIGTERM). Exit status,
    seconds, output and that signal."""
    path = out_dir / f"{step.log}.log"
    with open(path, "a") as log:
        log.write(f"$ {shown_command(step.command)[1:-1]}\n")
        log.flush()
        start = log.tell()
        started = time.perf_counter()
        # its own process group (a session: process_group= needs Python 3.11): a signal reaches its workers too
        # (recipes.py passes it on to its pretrain.py, in a session of its own: a SIGKILL does not reach that one)
        process = subprocess.Popen(step.command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                   start_new_session=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
        stopped = None
        try:
            code = process.wait(timeout=max(seconds_left, 1))
        except subprocess.TimeoutExpired:
            code = stop(process, signal.SIGINT)
        except Stopped as e:
            code, stopped = stop(process, e.signal), e.signal
        seconds = time.perf_counter() - started
    code = 128 - code if code < 0 else code  # killed by signal N (-N): 128 + N, as a shell says it
    with open(path, "a") as log:
        log.write(f"# exit {code}, {seconds:.1f} s\n\n")
    with open(path) as log:
        log.seek(start)
        return code, seconds, log.read(), stopped


def stop(process: subprocess.Popen, sig: signal.Signals) -> int:
    """SIG (a training run saves its resume state and stops), then SIGKILL if it has not ended in STOP_GRACE_S."""
    os.killpg(process.pid, sig)
    try:
        return process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return process.wait()


def run_all(steps: list[Step], scale: Scale, out_dir: Path, header: str, deadline: float) -> int:
    """Each step that fits in the time left, results.md rewritten after each; the number of failed steps."""
    rows, succeeded, failed = [], set(), 0
    images_per_s = scale.images_per_s
    for step in steps:
        command, left, stopped = shown_command(step.command), deadline - time.monotonic(), None
        needs = estimate(step, images_per_s)
        if step.needs is not None and step.needs not in succeeded:
            rows.append((step.name, "not run", f"{step.needs} did not succeed", command))
        elif needs > left:
            rows.append((step.name, "not run", f"needs about {needs:.0f} s, {max(left, 0):.0f} s were left",
                         command))
        else:
            print(f"headline.py: {step.name} (about {needs:.0f} s of {left:.0f} s left) ...", file=sys.stderr,
                  flush=True)
            code, seconds, output, stopped = run_step(step, out_dir, left)
            found = figures(step, output)
            if step.name == THROUGHPUT_RUNS[0][0] and found:  # training steps' estimates use what it measured
                images_per_s = max(float(found[0][1].split(" / ")[0]), 1.0)
            ended = f", stopped by {stopped.name}" if stopped else f", exit {code}" if code else ""
            wall = f"{seconds:.1f} s{ended}"
            rows.append((step.name, wall, "; ".join(f"{figure}: {value}" for figure, value in found), command))
            succeeded |= {step.name} if code == 0 else set()
            failed += code != 0
        write_results(out_dir, header, rows)
        if stopped:
            raise Stopped(stopped)
    return failed


def generate_data(root: Path, classes: int = 10, train: int = 12, test: int = 4, size: int = 32) -> Path:
    """The rehearsal's data set: each class a colour, each image that colour plus noise."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("test", test)):
        for c, colour in enumerate(rng.integers(0, 256, (classes, 3))):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(np.clip(colour + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)).save(
                    folder / f"{i}.png")
    return root


def build_parser() -> argparse.ArgumentParser:
    """headline.py's flags, also the `invoke headline` task's."""
    parser = cli.ArgumentParser(__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="checkpoints/headline", help="the steps' logs and results.md")
    parser.add_argument("--source", default=str(SHARED_ARCHIVE), help="the CIFAR-10 archive or folder (no network)")
    parser.add_argument("--minutes", type=positive_float, default=12.0, help="no step starts that would end after this")
    parser.add_argument("--work-dir", default=None,
                        help="data and checkpoints (default: data/headline, data/headline-rehearsal)")
    parser.add_argument("--rehearse", action="store_true",
                        help="the same steps on the CPU at toy scale, on a generated data set")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.work_dir is None:
        args.work_dir = str(ROOT / "data" / ("headline-rehearsal" if args.rehearse else "headline"))
    return args


def make_folder(flag: str, folder: Path) -> None:
    """The folder, made before any step: a file in the way, or no permission, is one line, not a traceback later."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()  # a real write: a read-only folder that exists passes mkdir
    except OSError as e:  # FileExistsError: a file holds the name; NotADirectoryError: a file on the way to it
        shown = "a file holds this name or a folder on the way to it" if isinstance(
            e, (FileExistsError, NotADirectoryError)) else (e.strerror or str(e))
        sys.exit(f"headline.py: {flag} {folder}: cannot make this folder or write in it ({shown}); choose another "
                 f"{flag}")


def check_budget(minutes: float, steps: list[Step], scale: Scale) -> None:
    """--minutes too short for any step that can start first: one line and exit 1, not a run of "not run" rows."""
    first = min((step for step in steps if step.needs is None), key=lambda step: estimate(step, scale.images_per_s))
    needs = estimate(first, scale.images_per_s)
    if needs > minutes * 60:
        sys.exit(f"headline.py: --minutes {minutes:g}: too short for any step (the shortest, {first.name}, needs "
                 f"about {needs:.0f} s); pass --minutes {math.ceil(needs / 6) / 10:g} or more")


def estimate(step: Step, images_per_s: float) -> float:
    """The step's seconds: its own, and its training images at `images_per_s`."""
    return step.seconds + step.images / images_per_s


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    deadline = time.monotonic() + args.minutes * 60
    scale, work, out_dir = REHEARSAL if args.rehearse else GPU, Path(args.work_dir), Path(args.out_dir)
    if not args.rehearse and not torch.cuda.is_available():
        sys.exit("headline.py: CUDA is not available on this machine, and this command measures a GPU; pass "
                 "--rehearse to rehearse it on the CPU")
    if not args.rehearse and not Path(args.source).exists():
        sys.exit(f"headline.py: --source {args.source}: no such archive or folder; pass the CIFAR-10 JPEG archive "
                 "(nothing is downloaded: the GPU machine has no network)")
    for flag, folder in (("--out-dir", out_dir), ("--work-dir", work)):
        make_folder(flag, folder)
    shutil.rmtree(work / RUN_FOLDER, ignore_errors=True)
    if args.rehearse:
        args.source = str(generate_data(work / "generated"))
    header = "\n".join(f"- {line}" for line in [
        *describe(torch.device(scale.device)).splitlines(), f"Python {sys.version.split()[0]}, started "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, --minutes {args.minutes:g}",
        *(["rehearsal: toy scale on the CPU; these figures only show that the command works"] * args.rehearse)])
    steps = plan(args, scale, work)
    check_budget(args.minutes, steps, scale)
    for sig in cli.stop_signals():  # Ctrl-C, a timeout's TERM, a closed terminal: the step under way stops cleanly
        signal.signal(sig, raise_stopped)
    try:
        failed = run_all(steps, scale, out_dir, header, deadline)
    except Stopped as e:
        print(f"headline.py: stopped by {e.signal.name}; what was measured is in {out_dir / 'results.md'}",
              file=sys.stderr)
        sys.exit(128 + e.signal)
    print(f"headline.py: {out_dir / 'results.md'}" + (f"; {failed} step(s) failed, see their logs" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    cli.run_script(main)
