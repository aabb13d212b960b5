"""Peak memory and wall time of a command and every process it starts, sampled from /proc every 20 ms.

    python benchmarks/peak_memory.py -- python predict.py photos/ --device cpu > /dev/null
    python benchmarks/peak_memory.py --make-set DIR --images 8000 --size 256   # a class-folder set to measure with

Peak RSS counts each process's resident pages (a memory-mapped file's pages too, shared ones once per process);
peak anonymous is its private memory alone (the heap, tensors), which a memory limit cannot reclaim.
"""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image


def tree(root: int) -> list[int]:
    """root and its descendants, from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def memory(pids: list[int]) -> tuple[int, int]:
    """Summed RSS and anonymous RSS in bytes."""
    rss = anon = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("RssAnon:"):
                    anon += int(line.split()[1]) * 1024
        except OSError:
            continue
    return rss, anon


def measure(command: list[str]) -> int:
    started = time.perf_counter()
    process = subprocess.Popen(command)
    peak_rss = peak_anon = 0
    while process.poll() is None:
        rss, anon = memory(tree(process.pid))
        peak_rss, peak_anon = max(peak_rss, rss), max(peak_anon, anon)
        time.sleep(0.02)
    code = 128 - process.returncode if process.returncode < 0 else process.returncode  # killed by N: as sh says it
    print(f"wall {time.perf_counter() - started:.1f} s, peak RSS {peak_rss / 2**20:.0f} MiB, peak anonymous "
          f"{peak_anon / 2**20:.0f} MiB, exit {code}: {' '.join(command)}", file=sys.stderr)
    return code


def make_set(root: Path, images: int, size: int, test: int) -> None:
    """train/ and test/ with two classes of `size` px noise PNGs: 16 distinct pictures per class, hard-linked (a
    decoder reads each file whole all the same)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for c, name in enumerate(("a", "b")):
        pictures = []
        for k in range(16):
            picture = root / f".{name}{k}.png"
            pixels = np.clip(rng.normal(60 + 120 * c, 50, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(picture)
            pictures.append(picture)
        for split, count in (("train", images // 2), ("test", test // 2)):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                os.link(pictures[i % 16], root / split / name / f"{i:06d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--make-set", type=Path, default=None, metavar="DIR", help="make a set instead of measuring")
    parser.add_argument("--images", type=int, default=8000, help="training images of --make-set")
    parser.add_argument("--test", type=int, default=200, help="test images of --make-set")
    parser.add_argument("--size", type=int, default=256, help="side of --make-set's images")
    parser.add_argument("command", nargs="*", help="the command to measure, after --")
    args = parser.parse_args()
    if args.make_set is None and not args.command:  # Popen([]) is an IndexError
        parser.error("pass --make-set DIR, or the command to measure after --")
    if args.make_set is None and not Path("/proc/self/status").is_file():
        parser.error("measures from Linux's /proc, which this system has not")
    if args.make_set is not None:
        make_set(args.make_set, args.images, args.size, args.test)
    else:
        sys.exit(measure(args.command))


if __name__ == "__main__":
    main()
