"""Training and evaluation images/s: this project's pipeline against the reference's, in one run.

    python benchmarks/throughput.py                      # CIFAR-10 at 224 px, batch 256, on CUDA
    python benchmarks/throughput.py --image-size 64 --batch-size 32 --steps 3 --device cpu   # a quick CPU check

ours: uint8 images resident on the device, augmentation batched there,
bf16 autocast and channels_last on CUDA and on AMX CPUs (pretrain.py's own train_step);
with --stream always, also the same steps with the images streamed from the
memory-mapped file (pinned, copied ahead on a side stream), in the same run.
reference: torchvision ImageFolder + RandomResizedCrop/flip transforms per
image in a DataLoader with 0 workers, fp32, as the reference did.
Warm-up steps are excluded from every timing.
"""
import argparse
import functools
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torchvision import datasets, transforms  # noqa: E402

import data  # noqa: E402
from model import AlexNet  # noqa: E402
from predict import compute_logits  # noqa: E402
from cli import Processes, code_version, positive_int, report_errors, run_script  # noqa: E402
from pretrain import make_parser, parse_flags, start_run, train_step  # noqa: E402

# pretrain.py's flags that say what a run trains or writes: a benchmark times --steps steps and writes nothing
RUN_ONLY_FLAGS = ("out", "epochs", "val_size", "limit", "resume", "overwrite")


def describe(device: torch.device) -> str:
    """What a measurement was taken on and with: the device, torch, the commit and the command line."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    command = shlex.join([sys.executable, *sys.argv])
    return f"device: {name}\ntorch {torch.__version__}, {code_version()}\ncommand: {command}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, warmup: int, steps: int, images_per_step: int, device: torch.device) -> float:
    """images/s over `steps` calls of step(i), after `warmup` calls that are not timed."""
    for i in range(warmup):
        step(i)
    synchronize(device)
    started = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    synchronize(device)
    return steps * images_per_step / (time.perf_counter() - started)


def ours(args, processes, train_images, val_images) -> tuple[float, float, bool]:
    model = AlexNet(num_classes=len(train_images.classes))
    run = start_run(args, "bench", processes, model, list(model.parameters()), train_images)
    n = len(train_images.labels)

    order = torch.arange((args.warmup + args.steps) * args.batch_size, device=processes.device) % n
    batches = train_images.batches(order, 0, args.batch_size, processes.share())
    step = functools.partial(train_next, run, batches)
    train = timed(step, args.warmup, args.steps, args.batch_size, processes.device)
    evaluate = timed(lambda i: compute_logits(model, (x for x, _ in val_images.batches(None, 0, args.batch_size)),
                                              args.image_size), 1, 1, len(val_images.labels), processes.device)
    return train, evaluate, run.bf16


def train_next(run, batches, i: int) -> None:
    """Step i of timed: pretrain.py's own training step on the next batch the images deliver."""
    images, labels = next(batches)
    train_step(run, images, labels, run.args.batch_size)


def forever(loader):
    """Batches from the loader, starting over at its end (small data sets in quick checks)."""
    while True:
        yield from loader


def reference(args, device) -> tuple[float, float]:
    normalize = transforms.Normalize(data.MEAN, data.STD)
    train_set = datasets.ImageFolder(Path(args.data_dir) / "train", transforms.Compose([
        transforms.RandomResizedCrop(args.image_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        normalize,
    ]))
    test_set = datasets.ImageFolder(Path(args.data_dir) / "test", transforms.Compose([
        transforms.Resize(int(args.image_size * data.EVAL_RESIZE)),
        transforms.CenterCrop(args.image_size),
        transforms.ToTensor(),
        normalize,
    ]))
    model = AlexNet(num_classes=len(train_set.classes)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loader = forever(torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True, num_workers=0))

    def step(i):
        x, y = next(loader)
        loss = F.cross_entropy(model(x.to(device)), y.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    model.train()
    train = timed(step, args.warmup, args.reference_steps, args.batch_size, device)
    model.eval()
    test_loader = forever(torch.utils.data.DataLoader(test_set, batch_size=args.batch_size, num_workers=0))

    @torch.no_grad()
    def evaluate(i):
        x, _ = next(test_loader)
        model(x.to(device))

    return train, timed(evaluate, 1, args.reference_steps, args.batch_size, device)


def build_parser() -> argparse.ArgumentParser:
    """throughput.py's flags, also the `invoke bench` task's."""
    parser = make_parser(__doc__.split("\n\n")[0], "bench")
    parser.add_argument("--steps", type=positive_int, default=50, help="timed training steps of ours")
    parser.add_argument("--reference-steps", type=positive_int, default=10,
                        help="timed steps of the reference pipeline")
    parser.add_argument("--warmup", type=positive_int, default=5, help="untimed steps first")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, given = parse_flags(parser, argv)
    for name in sorted(given.intersection(RUN_ONLY_FLAGS)):  # taken and ignored, the figures would seem to obey them
        parser.error(f"--{name.replace('_', '-')}: a training run's flag; throughput.py times --steps steps of "
                     "--batch-size images and writes nothing")
    report_errors("throughput.py", args.batch_size, lambda: measure(args))  # no data, no CUDA: one line


def measure(args: argparse.Namespace) -> None:
    processes = Processes(args.device)
    device = processes.device
    print(describe(device))
    compiled = ", compiled" if args.compile else ""
    print(f"batch size {args.batch_size}, image size {args.image_size}, precision {args.precision}{compiled}")

    started = time.perf_counter()
    train_images = data.load_folder(Path(args.data_dir) / "train", cache=False)
    print(f"decoding {len(train_images.labels)} training images (no cache): {time.perf_counter() - started:.1f} s, "
          f"{len(train_images.labels) / (time.perf_counter() - started):.0f} images/s")
    val_size = min(5000, len(train_images.labels) // 10)
    val_images = train_images.subset(data.stratified_split(train_images.labels, val_size, 0)[0])

    our_train, our_eval, bf16 = ours(args, processes, train_images.to(device), val_images.to(device))
    if args.stream == "always":  # the same steps with the images streamed from the mapped file, in this run
        streamed_train, streamed_eval, _ = ours(args, processes, train_images.streamed(device),
                                                val_images.streamed(device))
    ref_train, ref_eval = reference(args, device)
    print(f"{'':10} {'ours':>10} {'reference':>10} {'ratio':>7}   (ours trained in {'bf16' if bf16 else 'fp32'})")
    print(f"{'train':10} {our_train:10.0f} {ref_train:10.0f} {our_train / ref_train:6.1f}x   images/s")
    print(f"{'evaluate':10} {our_eval:10.0f} {ref_eval:10.0f} {our_eval / ref_eval:6.1f}x   images/s")
    if args.stream == "always":
        print(f"{'':10} {'streamed':>10} {'resident':>10} {'ratio':>7}")
        print(f"{'train':10} {streamed_train:10.0f} {our_train:10.0f} {streamed_train / our_train:6.2f}x   images/s")
        print(f"{'evaluate':10} {streamed_eval:10.0f} {our_eval:10.0f} {streamed_eval / our_eval:6.2f}x   images/s")


if __name__ == "__main__":
    run_script(main)
