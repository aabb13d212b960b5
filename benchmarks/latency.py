"""Latency and throughput of a checkpoint's model, eager, against its exported program (export.py).

    python benchmarks/latency.py --checkpoint checkpoints/finetune.pt                     # exported here, in memory
    python benchmarks/latency.py --checkpoint checkpoints/finetune.pt --program model.pt2

Both compute the same thing (export.Deployed): uint8 images at the stored size in, probabilities out, in fp32,
without gradients. On the CPU, and on CUDA where there is one: the latency of batch 1 over --runs calls (median and
95th percentile), and the images/s of batch --batch-size over --batch-runs calls, each after --warmup calls that are
not timed. The images are random: the time depends on their shape only.
"""
import argparse
import sys
import time

from throughput import describe, synchronize

import torch  # noqa: E402  (after throughput, which puts the project on the path)
from torch.export.passes import move_to_device_pass  # noqa: E402

import cli  # noqa: E402
import export  # noqa: E402
import predict  # noqa: E402
from model import load_checkpoint  # noqa: E402


def seconds_per_call(run, images: torch.Tensor, warmup: int, runs: int, device: torch.device) -> torch.Tensor:
    """The time of each of `runs` calls of run(images), after `warmup` calls that are not timed."""
    for _ in range(warmup):
        run(images)
    times = []
    for _ in range(runs):
        synchronize(device)
        started = time.perf_counter()
        run(images)
        synchronize(device)
        times.append(time.perf_counter() - started)
    return torch.tensor(times, dtype=torch.float64)


@torch.no_grad()
def measure(run, size: int, args: argparse.Namespace, device: torch.device) -> tuple[float, float, float]:
    """Batch 1's median and 95th percentile latency in ms, and images/s at --batch-size."""
    generator = torch.Generator().manual_seed(0)
    one, many = (torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator).to(device)
                 for n in (1, args.batch_size))
    single = seconds_per_call(run, one, args.warmup, args.runs, device)
    batched = seconds_per_call(run, many, args.warmup, args.batch_runs, device)
    return (float(single.median()) * 1e3, float(single.quantile(0.95)) * 1e3,
            args.batch_size * args.batch_runs / float(batched.sum()))


@torch.no_grad()
def check_program(program, record: dict, eager: export.Deployed, checkpoint: dict, args: argparse.Namespace) -> None:
    """--program is --checkpoint's: its record's classes and sizes, and its probabilities on a few images, on the CPU
    as `eager` is (a program exported with --device cuda moved there first) (before: another checkpoint's program
    was timed as this one's, or one of another size failed with a traceback)."""
    size = checkpoint["stored_size"]
    ours = {"classes": checkpoint["classes"], "stored_size": size,
            **{key: eager.evaluation[key] for key in ("image_size", "tta")}}
    differ = [key for key, value in ours.items() if record.get(key) != value]
    if not differ:
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8, generator=generator)
        on_cpu = move_to_device_pass(program, torch.device("cpu")).module()
        if (on_cpu(images) - eager(images)).abs().max() > export.TOLERANCE:
            differ = ["probabilities"]
    if differ:
        source = cli.shown(str(record.get("checkpoint")))
        raise cli.UsageError(f"--program {cli.shown(args.program)}: not exported from --checkpoint "
                             f"{cli.shown(args.checkpoint)} (the {', '.join(differ)} differ; it was exported from "
                             f"{source}); pass the program exported from it, or leave out --program to export it here")


def latency(args: argparse.Namespace) -> int:
    checkpoint = load_checkpoint(args.checkpoint)
    eager = export.Deployed(checkpoint, args.checkpoint)
    size = checkpoint["stored_size"]
    if args.program is None:
        program = export.export_program(eager, size, torch.device("cpu"))
    else:
        program, record = predict.load_program(args.program)
        check_program(program, record, eager, checkpoint, args)
    devices = [torch.device("cpu")] + [torch.device("cuda")] * torch.cuda.is_available()
    print(describe(devices[-1]))
    print(f"{cli.shown(args.checkpoint)}: {size} x {size} uint8 in, image size {checkpoint['image_size']}, "
          f"tta {checkpoint.get('tta', False)}; program {args.program or 'exported here'}")
    print(f"| device | model | batch 1 median ms | batch 1 p95 ms | batch {args.batch_size} images/s |")
    print("| --- | --- | --- | --- | --- |")
    for device in devices:
        runs = {"eager": eager.to(device), "exported": move_to_device_pass(program, device).module()}
        for name, run in runs.items():
            median, p95, rate = measure(run, size, args, device)
            print(f"| {device.type} | {name} | {median:.2f} | {p95:.2f} | {rate:.0f} |", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--checkpoint", default=predict.DEFAULT_CHECKPOINTS[0], help="the checkpoint, run eagerly")
    add("--program", default=None, help="its exported program (default: exported from it here, in memory)")
    add("--runs", type=cli.positive_int, default=100, help="timed calls at batch 1")
    add("--batch-size", type=cli.positive_int, default=64, help="the batch whose images/s is measured")
    add("--batch-runs", type=cli.positive_int, default=10, help="timed calls at --batch-size")
    add("--warmup", type=cli.positive_int, default=10, help="calls before each timing, not timed")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(cli.report_errors("latency.py", args.batch_size, lambda: latency(args)))


if __name__ == "__main__":
    cli.run_script(main)
