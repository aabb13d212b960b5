"""Recipe search: pretrain.py once per recipe, the same other flags, one results table.

    python benchmarks/recipes.py                     # the recipes below at full scale: a GPU's work
    python benchmarks/recipes.py --recipe reference --recipe crop --image-size 64 --limit 10000 --epochs 15 --device cpu
    python benchmarks/recipes.py --recipe mine="--lr 0.02 --augment crop --ema 0.999"

Every flag this script does not know goes to pretrain.py, before the recipe's
own flags, so a recipe's flags win. Each run writes DIR/NAME.pt and friends and
its log DIR/NAME.log. The table (markdown) gives the recipe, its flags, the
epochs, the wall time, the best validation accuracy and its epoch, and the test
accuracy, which pretrain.py measured once, with the best-validation weights.
The device, torch version, commit and command come first.
"""
import argparse
import contextlib
import csv
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from throughput import ROOT, describe

import cli  # noqa: E402
from cli import DEVICE_HELP, UsageError, resolve_device  # noqa: E402

# Candidates for CIFAR-10; the reference recipe is pretrain.py's defaults.
RECIPES = {
    "reference": "--lr 0.01",
    "lr0.03": "--lr 0.03",
    "crop": "--lr 0.03 --augment crop",
    "crop-cutout": "--lr 0.03 --augment crop --cutout 0.5",
    "crop-cosine-wd": "--lr 0.03 --augment crop --lr-schedule cosine --warmup-epochs 1 --weight-decay 5e-4",
    # an EMA decay of 0.999 averages over ~1,000 steps: meant for full-scale runs
    # (40 epochs of 45,000 images is 7,000 steps)
    "crop-cosine-wd-ls-ema-tta": "--lr 0.03 --augment crop --lr-schedule cosine --warmup-epochs 1 --weight-decay 5e-4 "
                                 "--label-smoothing 0.1 --ema 0.999 --tta",
}


def recipe(text: str) -> tuple[str, str]:
    """NAME=FLAGS, or the NAME of one of RECIPES."""
    name, given, flags = text.partition("=")
    if not given:
        if name not in RECIPES:
            raise argparse.ArgumentTypeError(f"no recipe {name!r}; known: {', '.join(RECIPES)}; or give NAME=\"FLAGS\"")
        flags = RECIPES[name]
    if not name or not name.replace("-", "").replace(".", "").replace("_", "").isalnum():
        raise argparse.ArgumentTypeError(
            f"recipe name {name!r}: use letters, digits, '.', '-' and '_' (it names files)")
    return name, flags


def run(name: str, flags: str, common: list[str], out_dir: Path) -> tuple[bool, str]:
    """Train one recipe; whether it finished, and its table row."""
    out = out_dir / f"{name}.pt"
    # --overwrite: a rerun of the benchmark replaces the recipe's earlier run
    command = [sys.executable, str(ROOT / "pretrain.py"), *common, "--out", str(out), "--overwrite",
               *shlex.split(flags)]
    started = time.perf_counter()
    posix = sys.platform != "win32"  # Windows: a console's Ctrl-C reaches both; a kill ends recipes.py at once
    with open(out_dir / f"{name}.log", "w") as log:
        # in a session of its own, the stop comes from here, once, whoever was sent it: a Ctrl-C and headline.py's
        # SIGINT go to the group, a `kill` to recipes.py alone (a second signal would stop pretrain.py unsaved)
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=posix)
        try:
            process.wait()
        except KeyboardInterrupt as stop:
            if posix:
                with contextlib.suppress(ProcessLookupError):  # it has just ended: wait() returns
                    os.killpg(process.pid, cli.signal_of(stop))
            print(f"recipes.py: stopped by {cli.signal_of(stop).name}; waiting for recipe {name}'s pretrain.py (pid "
                  f"{process.pid}) to save its resume state and end (see {log.name})", file=sys.stderr, flush=True)
            process.wait()  # before: subprocess.run killed it 0.25 s after a Ctrl-C, its resume state unsaved
            raise
    wall = time.perf_counter() - started
    if process.returncode != 0:
        last = (out_dir / f"{name}.log").read_text().strip().splitlines()[-1:] or ["no output"]
        return False, f"| {name} | `{flags}` | failed (exit {process.returncode}): {last[0]} | | | |"
    report = json.loads(out.with_suffix(".test.json").read_text())
    with open(out.with_suffix(".csv"), newline="") as log:
        epochs = len(list(csv.DictReader(log)))
    return True, (f"| {name} | `{flags}` | {epochs} | {wall:.0f} s | {report['val_acc']:.2%} (epoch {report['epoch']}) "
                  f"| {report['accuracy']:.2%} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter, allow_abbrev=False,
        epilog="Every other flag goes to pretrain.py (see its --help), before the recipe's own flags.")
    parser.add_argument("--recipe", type=recipe, action="append", metavar='NAME[="FLAGS"]',
                        help=f"a recipe to run, repeatable (default: all of {', '.join(RECIPES)})")
    parser.add_argument("--out-dir", default="checkpoints/recipes", help="checkpoints and logs, NAME.pt and NAME.log")
    parser.add_argument("--device", default="auto", help=f"{DEVICE_HELP}; passed to pretrain.py")
    args, common = parser.parse_known_args()
    recipes = args.recipe or list(RECIPES.items())
    try:
        device = resolve_device(args.device)
    except UsageError as e:
        sys.exit(f"recipes.py: {e}")
    common += ["--device", str(device)]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    print(describe(device))
    print(f"pretrain.py flags of every run: {shlex.join(common)}\n")
    print("| recipe | flags | epochs | wall | best val (epoch) | test |\n"
          "| --- | --- | --- | --- | --- | --- |", flush=True)
    finished = True
    for name, flags in recipes:
        ok, row = run(name, flags, common, out_dir)
        finished &= ok
        print(row, flush=True)
    sys.exit(0 if finished else 1)


if __name__ == "__main__":
    cli.run_script(main)  # a stop signal: a KeyboardInterrupt naming it, ended in one line (see run)
