"""How long pretrain.py's per-epoch checkpoint save blocks the training thread, at the real model size.

    python benchmarks/checkpoint_writes.py                       # 10 epochs of 1 s, on CUDA if there is one
    python benchmarks/checkpoint_writes.py --device cuda --epoch-seconds 0.2

Each epoch changes every weight and momentum buffer in place, as a training
step does, hands the best checkpoint (the model) and the resume state (model
and SGD momentum) to one CheckpointWriter together, as pretrain.py's end_epoch
does, and waits --epoch-seconds. It prints each save's blocking time, how many
writes reached the disk (a save replaces an unstarted write of its file), and
how long the last writes took after the last epoch, and the process's peak
memory.
"""
import resource
import statistics
import tempfile
import time

from throughput import describe

import torch  # noqa: E402  (on the path that throughput set)

import cli  # noqa: E402
import pretrain  # noqa: E402
from model import AlexNet  # noqa: E402
from cli import DEVICE_HELP, positive_int, resolve_device  # noqa: E402


class CountedWrites:
    """pretrain.save_checkpoint, counting the writes that reach the disk."""

    def __init__(self) -> None:
        self.save = pretrain.save_checkpoint
        self.count = 0

    def __call__(self, checkpoint: dict, path) -> None:
        self.count += 1
        self.save(checkpoint, path)


def trained_model(device: torch.device, classes: int) -> tuple[AlexNet, torch.optim.Optimizer]:
    """AlexNet at 224 px after one SGD step, so that the optimizer holds its momentum buffers."""
    model = AlexNet(num_classes=classes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model(torch.randn(2, 3, 224, 224, device=device)).sum().backward()
    optimizer.step()
    return model, optimizer


def main() -> None:
    parser = cli.ArgumentParser(__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=positive_int, default=10, help="saves, one per epoch")
    parser.add_argument("--epoch-seconds", type=cli.non_negative_float, default=1.0,
                        help="the training time between saves")
    parser.add_argument("--classes", type=positive_int, default=10, help="outputs of the model's head")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--out-dir", default=None, help="where the two files go (default: a temporary folder)")
    args = parser.parse_args()
    try:
        folder = tempfile.TemporaryDirectory(dir=args.out_dir)
    except OSError as e:
        parser.error(f"--out-dir {args.out_dir}: cannot make a folder in it ({e.strerror or e}); pass a writable "
                     "folder")
    with folder:
        cli.report_errors("checkpoint_writes.py", 1, lambda: measure(args, folder.name))  # --device cuda, none here


def measure(args, folder: str) -> None:
    device = resolve_device(args.device)
    print(describe(device))
    model, optimizer = trained_model(device, args.classes)
    megabytes = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e6
    print(f"best checkpoint {megabytes:.0f} MB, resume state {2 * megabytes:.0f} MB, every epoch")
    writes = CountedWrites()
    blocked = []
    with cli.CheckpointWriter(writes) as writer:
        for epoch in range(args.epochs):
            with torch.no_grad():  # a training step changes the tensors in place
                for group in optimizer.state.values():
                    group["momentum_buffer"].add_(1e-3)
                for parameter in model.parameters():
                    parameter.add_(1e-3)
            started = time.perf_counter()
            writer.save_together({f"{folder}/best.pt": {"model": model.state_dict()},
                                  f"{folder}/last.pt": {"model": model.state_dict(),
                                                        "optimizer": optimizer.state_dict()}})
            blocked.append(time.perf_counter() - started)
            print(f"epoch {epoch + 1}: save blocked {blocked[-1]:.3f} s", flush=True)
            time.sleep(args.epoch_seconds)
        started = time.perf_counter()
        writer.wait()
        flushed = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux
    print(f"save: median {statistics.median(blocked):.3f} s, most {max(blocked):.3f} s, first {blocked[0]:.3f} s "
          f"(fresh memory); {writes.count} writes of {2 * args.epochs} saves reached the disk; the last ones "
          f"{flushed:.2f} s after the last epoch; peak memory {peak:.2f} GB")


if __name__ == "__main__":
    cli.run_script(main)
