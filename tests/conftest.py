import contextlib
import csv
import hashlib
import http.server
import importlib
import io
import math
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import traceback
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def usable_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may use: its affinity, within a CPU quota as a container's --cpus sets (cgroup v2's
    cpu.max, v1's cfs quota), which xdist's `-n auto` and torch do not read (2 CPUs' worth on a 64-core host: 64)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError):  # "QUOTA PERIOD", or "max PERIOD": no quota
        quota, period = (cgroup / "cpu.max").read_text().split()
        cores = min(cores, math.ceil(int(quota) / int(period)))
    with contextlib.suppress(OSError, ValueError):  # a quota of -1: none
        quota, period = (int((cgroup / "cpu" / name).read_text()) for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
        cores = min(cores, math.ceil(quota / period)) if quota > 0 else cores
    return max(1, cores)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist's: without it (the GPU machines), none
def pytest_xdist_auto_num_workers(config) -> int | None:
    """pytest.ini's `-n auto`: a worker per usable core (None: PYTEST_XDIST_AUTO_NUM_WORKERS, which xdist reads)."""
    return None if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS") else usable_cores()


# pytest.ini starts a pytest-xdist worker per core: each worker, and every script it starts, computes on its share
# of the cores (torch's default, a thread per core in every process, made two workers on 2 cores slower than one).
# torch is imported here, in a worker, and by the test modules: not in pytest-xdist's controller, which runs no test
# and starts the workers only once this file is read (importing torch there cost every run 2.3 s before any test).
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    import torch

    THREADS = max(1, usable_cores() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
    torch.set_num_threads(THREADS)  # where torch came before the variable (imported by a plugin, a sitecustomize)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"

# Flags that keep a training run to seconds on the CPU. No --precision: on a CPU with AMX (this project's machines)
# the tests train in bf16 with channels_last and the fused SGD, CUDA's code path; one that needs fp32 says so.
# pretrain.py's: a classifier 64 and 32 wide instead of the reference's 4096 and 1024 (3 M parameters instead of 44 M,
# 12 MB checkpoints instead of 178 MB), which no test of a mechanism needs.
# QUICK_NO_HIDDEN: finetune.py's (its widths are its checkpoint's), and pretrain.py's where the reference's widths are
# tested (--init with torchvision's weights); the real-data run, invoke all and the headline rehearsal use neither.
QUICK_NO_HIDDEN = ["--image-size", "64", "--batch-size", "16", "--lr", "0.02", "--device", "cpu"]
QUICK = ["--hidden", "64,32", *QUICK_NO_HIDDEN]


def training_log(out: Path) -> list[dict]:
    """The rows of a run's .csv log."""
    with open(out.with_suffix(".csv"), newline="") as log:
        return list(csv.DictReader(log))


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow: end-to-end runs (training, real processes); `-m 'not slow'` skips them")


def pytest_collection_modifyitems(config, items) -> None:
    """The slow tests first, in their files' order: pytest-xdist hands tests out in this order, so the quick ones fill
    the end; the longest (a minute) came last and ran alone while the other workers had finished."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


# Importing torchvision, or torch._dynamo (which making a torch optimizer imports), makes torch.compile's default cache
# folder (torchinductor_<user>), empty: the tests' compiles use the run's folder (temporary_folder). A run leaves none
# that it did not find.
TEMPORARY = Path(tempfile.gettempdir())
INDUCTOR_FOLDERS_FOUND = set(TEMPORARY.glob("torchinductor_*"))


def pytest_unconfigure(config) -> None:
    for folder in set(TEMPORARY.glob("torchinductor_*")) - INDUCTOR_FOLDERS_FOUND:
        with contextlib.suppress(OSError):  # not empty, or gone already (another pytest-xdist worker's)
            folder.rmdir()


def bare_environment(**variables: str) -> dict[str, str]:
    """A child's environment without the user's (PATH, and what is given), but with where the run keeps temporary
    files and how many threads a process takes (temporary_folder, the worker's share of the cores)."""
    kept = ("TMPDIR", "TORCHINDUCTOR_CACHE_DIR", "OMP_NUM_THREADS")
    return {"PATH": "/usr/bin:/bin", **{name: os.environ[name] for name in kept if name in os.environ}, **variables}


def default_signals() -> None:
    """`preexec_fn` of a child that a test signals: SIGINT, SIGTERM and SIGHUP as on a terminal. A suite started in
    the background (`nohup python -m pytest > log &`) runs with SIGINT and SIGHUP ignored, and an ignored signal
    stays ignored in every child, through exec: the test would send a signal that nothing receives."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def make_class_folders(root: Path, classes=("red", "green", "blue"), train=16, test=6, size=32, seed=0) -> Path:
    """train/ and test/ class folders of noisy images whose mean colour gives the class away."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("test", test)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            colour = np.zeros(3)
            colour[c % 3] = 200
            colour[(c // 3) % 3] += 55 * (c // 3)
            for i in range(count):
                pixels = np.clip(colour + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return root


def refuse_listing(monkeypatch, folder: Path) -> None:
    """`folder` cannot be listed, as without read permission: simulated, for root reads any folder."""
    real_iterdir = type(folder).iterdir

    def iterdir(path):
        if path == folder:
            raise PermissionError(13, "Permission denied", str(path))
        return real_iterdir(path)

    monkeypatch.setattr(type(folder), "iterdir", iterdir)


def read_terminal(parent: int) -> str:
    """All a pseudo-terminal's writer wrote, once it has closed its side; `parent` is closed."""
    written = b""
    while True:  # a terminal hands the writes over in pieces; EIO once the writer's side is closed
        try:
            piece = os.read(parent, 10_000)
        except OSError:
            break
        if not piece:
            break
        written += piece
    os.close(parent)
    return written.decode()


def run(script: str, *args, check: bool = True, process: bool = False, cwd: Path = ROOT,
        **kwargs) -> subprocess.CompletedProcess:
    """Run a project script as a user does, and return its exit status and output.

    In this process by default (its `main(argv)`, with stdout, stderr and the working folder
    swapped for the call): a new Python costs seconds of importing torch and tests nothing more.
    `process=True` starts a real one, for what only a process shows (signals, the script as a file).
    """
    if process or kwargs:
        result = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True,
                                text=True, cwd=cwd, **kwargs)
    else:
        result = run_in_process(script, [str(a) for a in args], cwd)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {args} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def run_in_process(script: str, argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`main(argv)` of the script's module, with what Python does at exit: SystemExit's code, or a traceback."""
    module = importlib.import_module(Path(script).stem)
    stdout, stderr = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), warnings.catch_warnings():
            warnings.simplefilter("default")  # a warning shows each run, as in a new process
            try:
                module.main(argv)
                code = 0
            except SystemExit as e:
                code = e.code
            except Exception:  # noqa: BLE001 - what Python prints for an uncaught error
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(previous)
    if isinstance(code, str):
        stderr.write(code + "\n")
        code = 1
    return subprocess.CompletedProcess([script, *argv], code or 0, stdout.getvalue(), stderr.getvalue())


class QuietHTTPServer(http.server.ThreadingHTTPServer):
    """A loopback server for download tests: a client that hangs up is what some tests do, not an error to print
    (the scripts' stderr is captured in this process, so the server's would be too)."""

    def handle_error(self, request, client_address) -> None:
        pass

    def serve_forever(self, poll_interval: float = 0.05) -> None:  # shutdown() waits up to one poll: keep it short
        super().serve_forever(poll_interval)


def start(out, epochs, data_dir, *extra) -> list[str]:
    """A run with many small steps; --ema and --cutout so that resuming must restore the average and every
    random draw."""
    return ["--data-dir", data_dir, "--out", out, "--epochs", str(epochs), "--val-size", "6", *QUICK,
            "--batch-size", "8", "--ema", "0.9", "--cutout", "0.25", *extra]


def stopped_status(sig: signal.Signals) -> int:
    """A script's status as subprocess gives it after a stop by `sig` (cli.run_script): killed by SIGINT, as Python
    ends at a Ctrl-C (a shell running it in a loop stops too); exit 128 + N for SIGTERM and SIGHUP."""
    return -sig if sig == signal.SIGINT else 128 + sig


def stop_during(title: str, sig: signal.Signals, args: list) -> str:
    """Start pretrain.py, send `sig` once the pass `title` shows progress (its first tenth: most of the pass is
    still to come, and a later arrival stops at the next epoch's start instead), return the stop's message."""
    process = subprocess.Popen([sys.executable, str(ROOT / "pretrain.py"), *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, preexec_fn=default_signals)
    for line in process.stderr:  # progress goes to stderr
        if line.startswith(f"  {title}: "):
            process.send_signal(sig)
            break
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == stopped_status(sig), stderr
    return stderr.strip().splitlines()[-1]


def error_line(result) -> str:
    """The last stderr line of a failed run (a progress bar may come before it),
    after checking there is no traceback."""
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def class_folder_archive(path: Path, tiny: Path, prefix: str = "cifar10/") -> None:
    """A .tar.gz or .zip of the class folders under `tiny`, nested in cifar10/ like the shared archive."""
    files = sorted(p for p in tiny.rglob("*.png"))
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w") as zf:
            for p in files:
                zf.write(p, prefix + str(p.relative_to(tiny)))
    else:
        with tarfile.open(path, "w:gz") as tar:
            for p in files:
                tar.add(p, prefix + str(p.relative_to(tiny)))


@pytest.fixture(scope="session", autouse=True)
def temporary_folder(tmp_path_factory):
    """What the scripts keep in the temporary folder (torch.compile's cache and headers, 150 MB) goes in the run's,
    which a passing run removes, not beside it: TMPDIR for the processes tests start, tempfile's for this one, and
    inductor's own variable (importing torch's modules sets it to the default)."""
    folder = tmp_path_factory.mktemp("tmp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(folder))
        patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(folder / "torchinductor"))
        patch.setattr(tempfile, "tempdir", str(folder))
        yield folder


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return make_class_folders(tmp_path_factory.mktemp("tiny") / "data")


@pytest.fixture(scope="session")
def pretrained(tiny_data, tmp_path_factory) -> Path:
    """A pretrain checkpoint from a few seconds of training on the tiny folders."""
    out = tmp_path_factory.mktemp("ckpt") / "pretrain.pt"
    run("pretrain.py", "--data-dir", tiny_data, "--out", out, "--epochs", "2", "--val-size", "6", *QUICK)
    return out


class SmallFilesystems:
    """Real tmpfs mounts in folders under `parent`; the test is skipped where this machine does not allow one."""

    def __init__(self, parent: Path) -> None:
        self.parent = parent
        self.mounted: list[Path] = []

    def __call__(self, size: str = "64m", read_only: bool = False, fallback: Path | None = None) -> Path:
        """A new tmpfs folder; where none can be mounted, `fallback`, or the test is skipped."""
        folder = self.parent / f"fs{len(self.mounted)}"
        folder.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
        if result.returncode != 0 and fallback is not None:
            return fallback
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
        self.mounted.append(folder)
        return folder

    def unmount_all(self) -> None:
        for folder in self.mounted:
            subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture
def small_filesystem(tmp_path):
    """small_filesystem(size="64m", read_only=False): a real tmpfs folder, unmounted after the test."""
    filesystems = SmallFilesystems(tmp_path)
    yield filesystems
    filesystems.unmount_all()
