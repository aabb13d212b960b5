"""What every script shares: one-line errors, flag types, the device, output that may close, progress lines, stop
signals, atomic (and background) writes, the lock keeping two runs apart, torchrun's processes, the code's version."""
import os
import sys

if sys.version_info < (3, 10):  # before an `X | Y` annotation fails with a traceback
    sys.exit(f"{os.path.basename(sys.argv[0])}: needs Python 3.10 or newer, this is %d.%d" % sys.version_info[:2])

import _thread
import argparse
import contextlib
import ctypes
import errno
import functools
import hashlib
import io
import json
import math
import queue
import re
import secrets
import signal
import stat
import subprocess
import sysconfig
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

# export.py's programs, and predict.py's loading of them, need torch.export of 2.8 (its pre-releases and builds too)
if tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) < (2, 8):
    sys.exit(f"{os.path.basename(sys.argv[0])}: needs torch 2.8 or newer, this is {torch.__version__}; upgrade torch "
             "and torchvision as requirements.txt says")

from model import MIN_IMAGE_SIZE, CheckpointError

try:
    import fcntl
except ImportError:  # Windows: its lock is msvcrt's (see Lock)
    fcntl = None
    import msvcrt

# --------------------------------------------------------------------------- errors and flags


class DataError(Exception):
    """Data that cannot be used (a folder, an image, an archive, a download); the message names it and what to do.
    `problem` (what is wrong) alone can be reported again with other advice by a caller that knows better."""

    def __init__(self, problem: str, fix: str = "") -> None:
        super().__init__(f"{problem}; {fix}" if fix else problem)
        self.problem = problem


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each default, except None: those flags' help says what happens instead."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's, with the help format above, no abbreviations, and its flags listed in `flags` (argparse keeps
    its own list private): invoke's tasks are made from them."""

    def __init__(self, description: str, **options) -> None:
        self.flags: list[argparse.Action] = []
        super().__init__(description=description, formatter_class=HelpFormatter, allow_abbrev=False, **options)
        self.flags.clear()  # --help, no flag of a task

    def add_argument(self, *names, **options) -> argparse.Action:
        self.flags.append(super().add_argument(*names, **options))
        return self.flags[-1]


class UsageError(Exception):
    """A command-line value that cannot be used; the message names the flag and what to do."""


def flag_type(name: str, convert: Callable[[str], float], *rules: tuple[Callable[[float], bool], str]):
    """An argparse type named `name` (argparse's "invalid NAME value" for text `convert` refuses): the converted
    value, or the message of the first (holds, message) rule it fails."""
    def check(text: str):
        value = convert(text)
        for holds, message in rules:
            if not holds(value):
                raise argparse.ArgumentTypeError(f"{message}, got {text}")
        return value
    check.__name__ = name
    return check


# The largest --image-size: 4.6 times the reference's 224; stored images are at most 256 px, so more only fills memory.
MAX_IMAGE_SIZE = 1024
# The optimizer holds --lr and --weight-decay in float32: a larger value is torch's overflow traceback.
FLOAT32_MAX = torch.finfo(torch.float32).max
WITHIN_FLOAT32 = (lambda x: x <= FLOAT32_MAX, f"too large: at most {FLOAT32_MAX:.3g}")

positive_int = flag_type("positive_int", int, (lambda x: x > 0, "must be a positive integer"))
positive_float = flag_type("positive_float", float, (lambda x: 0 < x < math.inf, "must be a positive number"),
                           WITHIN_FLOAT32)
non_negative_float = flag_type("non_negative_float", float,
                               (lambda x: 0 <= x < math.inf, "must be zero or a positive number"), WITHIN_FLOAT32)
fraction = flag_type("fraction", float, (lambda x: 0 <= x < 1, "must be at least 0 and below 1"))
probability = flag_type("probability", float, (lambda x: 0 <= x <= 1, "must be a probability from 0 to 1"))
random_seed = flag_type("random_seed", int, (lambda x: 0 <= x < 2**32, f"must be an integer from 0 to {2**32 - 1}"))
image_size = flag_type("image_size", int,
                       (lambda x: x >= MIN_IMAGE_SIZE, f"AlexNet needs images of at least {MIN_IMAGE_SIZE} px"),
                       (lambda x: x <= MAX_IMAGE_SIZE, f"at most {MAX_IMAGE_SIZE} px (the reference used 224)"))
stored_size = flag_type("stored_size", int, (lambda x: 8 <= x <= MAX_IMAGE_SIZE,
                                             f"must be at least 8 and at most {MAX_IMAGE_SIZE} px"))
DEVICE_HELP = "cuda, cuda:N, mps, cpu, or auto: CUDA if available, else MPS (Apple's GPU), else the CPU"


def hidden_widths(text: str) -> tuple[int, int]:
    with contextlib.suppress(ValueError):
        if len(widths := tuple(map(int, text.split(",")))) == 2 and min(widths) >= 1:
            return widths
    raise argparse.ArgumentTypeError(f"must be two positive integers with a comma between, e.g. 4096,1024, got {text}")


def resolve_device(name: str) -> torch.device:
    """--device: `auto` is CUDA when there is one, else Apple's MPS, else the CPU with a warning."""
    # each asked only when needed: asking for CUDA starts its driver, and a broken one warns (not for --device cpu)
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available, "cpu": lambda: True}
    if name == "auto":
        kind = next(kind for kind, there in available.items() if there())
        if kind == "cpu":
            print("warning: neither CUDA nor MPS is available, running on the CPU (slow); pass --device cpu to "
                  "silence this", file=sys.stderr)
        return torch.device(kind)
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device name; use auto, cuda, cuda:N, mps or cpu") from None
    if device.type not in available or (device.type != "cuda" and device.index not in (None, 0)):
        raise UsageError(f"--device {name}: not supported by these scripts; use auto, cuda, cuda:N, mps or cpu")
    if not available[device.type]():
        what = "CUDA" if device.type == "cuda" else "MPS (Apple's GPU)"
        raise UsageError(f"--device {name}: {what} is not available on this machine; use --device auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"numbered from 0; pass one of them")
    return device if device.type == "cuda" else torch.device(device.type)


def free_memory(device: torch.device) -> int:
    """Bytes free on the device: for the CPU (and Apple's MPS, which shares it) the host's available memory, within
    this process's cgroup limit on Linux. Without /proc (macOS) half the host's memory is taken as free; where that
    cannot be read either (Windows), none: a set then streams, with the same results (and on the CPU about as fast)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if (free := linux_available_memory()) is not None:
        return free
    with contextlib.suppress(ValueError, OSError, AttributeError):  # macOS counts no available pages
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    return 0


def linux_available_memory() -> int | None:
    """/proc/meminfo's MemAvailable, and the cgroup's limit less its use; None where there are neither."""
    free = []
    with contextlib.suppress(OSError, TypeError):  # TypeError: no such line
        free.append(int(re.search(r"^MemAvailable:\s*(\d+)", Path("/proc/meminfo").read_text(), re.M)[1]) * 1024)
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            v1 = "memory" in controllers.split(",")
            if v1 or controllers == "":
                mount, parts = Path("/sys/fs/cgroup") / ("memory" if v1 else ""), Path(path).parts[1:]
                # in a container the mount is the container's own cgroup: the path's tail names ours below it
                folder = next((f for i in range(len(parts) + 1) if (f := mount.joinpath(*parts[i:])).is_dir()), mount)
                limit, used = (("memory.limit_in_bytes", "memory.usage_in_bytes") if v1
                               else ("memory.max", "memory.current"))
                with contextlib.suppress(OSError, ValueError):
                    free.append(int((folder / limit).read_text()) - int((folder / used).read_text()))
    return min(free) if free else None


def report_errors(program: str, batch_size: int, job: Callable[[], object]) -> object:
    """Run a script's work; a user's mistake, an expected fault or a stop signal ends as one line on stderr."""
    try:
        return job()
    except (UsageError, DataError, CheckpointError) as e:
        sys.exit(f"{program}: {e}")
    except torch.cuda.OutOfMemoryError:
        sys.exit(f"{program}: out of GPU memory with --batch-size {batch_size}; pass a smaller --batch-size, "
                 f"e.g. {max(1, batch_size // 2)}")
    except (MemoryError, RuntimeError) as e:  # torch's CPU allocator raises a plain RuntimeError when malloc fails
        if isinstance(e, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" not in str(e):
            raise
        sys.exit(f"{program}: out of host memory with --batch-size {batch_size}; pass a smaller --batch-size "
                 f"(e.g. {max(1, batch_size // 2)}) or --image-size, or free memory")
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM or SIGHUP in a script (run_script), no StopSignal's stop
        print(f"{program}: interrupted; nothing more was saved", file=sys.stderr)
        sys.exit(128 + signal_of(e))  # stopped by a signal: 128 + N, not a failure's 1


# --------------------------------------------------------------------------- output


def json_text(value, indent: int | None = None) -> str:
    """JSON any reader takes: a NaN or infinity (a loss that overflowed) as null, not json.dumps' NaN or Infinity."""
    finite = json.loads(json.dumps(value), parse_constant=lambda token: None)
    return json.dumps(finite, indent=indent, allow_nan=False)


class Output:
    """sys.stdout or sys.stderr, for which a closed pipe, a hang-up (EIO) or a full disk is an ordinary event: the
    first failed write or flush is kept in `lost` (one closed at the start, `>&-`, is lost from the start) and the
    descriptor then points at /dev/null, so nothing later fails again (Python's flush at exit included); the caller
    decides what the loss means. `whole`: a regular file is cut back to where writing started on a loss."""

    def __init__(self, stream, whole: bool = False) -> None:
        self.stream = stream if stream is not None else open(os.devnull, "w")
        self.lost: OSError | None = None if stream is not None else OSError(errno.EBADF, os.strerror(errno.EBADF))
        self.lost_told = False  # whether the program has said so
        self.start = None  # where writing starts in a regular file (`> file` or `>> file`), when `whole`
        with contextlib.suppress(OSError, ValueError):  # no file descriptor (a test's StringIO)
            fd = self.stream.fileno() if whole else None  # not asked otherwise: an IDE's console may have no fileno
            if fd is not None and stat.S_ISREG(os.fstat(fd).st_mode):
                appends = fcntl is not None and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND  # Windows: cmd's >> seeks
                self.start = os.fstat(fd).st_size if appends else os.lseek(fd, 0, os.SEEK_CUR)

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError as e:
            self.lose(e)
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as e:
            self.lose(e)

    def lose(self, error: OSError) -> None:
        self.lost = self.lost or error
        with contextlib.suppress(OSError, ValueError):  # no file descriptor (a test's StringIO)
            if self.start is not None:  # back to the start too: `2>&1` shares the offset, no hole before stderr's
                os.ftruncate(self.stream.fileno(), self.start)
                os.lseek(self.stream.fileno(), self.start, os.SEEK_SET)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)

    def isatty(self) -> bool:
        return self.lost is None and self.stream.isatty()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def say_if_stdout_lost(program: str, kept: str, closed_pipe: bool = False) -> None:
    """Lines on stdout lost (a full disk or EIO under `> log`), said once, in one line on stderr with what is `kept`;
    a closed pipe (`| head`) or `>&-` only with `closed_pipe` (a training's lines are its log: it goes on, says so)."""
    sys.stdout.flush()  # a line still buffered meets the full disk here, not silently at exit
    lost = getattr(sys.stdout, "lost", None)
    if lost is None or getattr(sys.stdout, "lost_told", True):
        return
    if closed_pipe or not (isinstance(lost, BrokenPipeError) or lost.errno == errno.EBADF):
        sys.stdout.lost_told = True
        print(f"{program}: cannot write to stdout any more ({lost.strerror or lost}); {kept}", file=sys.stderr)


def guard_output(whole: bool = False) -> None:
    """sys.stdout and sys.stderr as Output (stdout `whole` or not): a script's output never ends it with a traceback."""
    sys.stdout = sys.stdout if isinstance(sys.stdout, Output) else Output(sys.stdout, whole)
    sys.stderr = sys.stderr if isinstance(sys.stderr, Output) else Output(sys.stderr)


def shown(path: str | os.PathLike) -> str:
    """A path as text any stream prints, unambiguously: control characters, backslashes, bytes not UTF-8 escaped."""
    return printable(os.fsdecode(path))


# Control characters as in a string literal: a newline or tab in a name would split a line of output (predict's
# tab-separated lines), an escape sequence drive the terminal. Bytes not UTF-8 (os.fsdecode's surrogates) as \xNN; a
# backslash as two where a name can hold one (not Windows): `new<LF>line` and a file named `new\nline` then differ.
ESCAPES = ({code: f"\\x{code:02x}" for code in (*range(32), 127)} | {9: "\\t", 10: "\\n", 13: "\\r"}
           | {0xDC00 + byte: f"\\x{byte:02x}" for byte in range(128, 256)} | ({92: "\\\\"} if os.sep == "/" else {}))


def printable(text: str) -> str:
    return text.translate(ESCAPES)


def clock(seconds: float) -> str:
    """HH:MM:SS with as many hours as it takes: strftime's %H wraps at a day, time.gmtime overflows past time_t."""
    whole = int(seconds)
    return f"{whole // 3600:02d}:{whole // 60 % 60:02d}:{whole % 60:02d}"


class ProgressLine:
    """How far a long pass over images is: on a terminal one line rewritten in place, at most twice a second; in a
    log file or pipe, a line at each tenth. `due` reads only the clock: the caller reads the device only to show.
    Without a `title`, never due: a pass that shows no progress."""
    TERMINAL_INTERVAL = 0.5  # seconds between rewrites of the terminal line

    def __init__(self, title: str | None, total: int, done: int = 0, stream=None) -> None:
        self.title, self.total, self.done_at_start = title, total, done
        self.stream = stream or sys.stderr  # progress, not a result (tqdm's convention): `> results` holds none
        self.terminal = self.stream.isatty()
        self.started = self.shown_at = time.perf_counter()
        self.next_tenth = done * 10 // max(total, 1) + 1
        self.shown = False

    def due(self, done: int) -> bool:
        if self.title is None or done >= self.total:  # the pass's own closing line says the rest
            return False
        if self.terminal:
            return time.perf_counter() - self.shown_at >= self.TERMINAL_INTERVAL
        return done * 10 >= self.next_tenth * self.total

    def show(self, done: int, extra: str = "") -> None:
        self.shown_at = time.perf_counter()
        rate = (done - self.done_at_start) / max(self.shown_at - self.started, 1e-9)
        eta = clock((self.total - done) / max(rate, 1e-9))
        text = f"  {self.title}: {done:,}/{self.total:,} images{extra}  {rate:,.0f} img/s  eta {eta}"
        if self.terminal:
            self.stream.write("\r" + text + "\x1b[K")  # back to the line's start, write, erase the rest
        else:
            self.stream.write(text + "\n")
            self.next_tenth = done * 10 // self.total + 1
        self.stream.flush()
        self.shown = True

    def close(self) -> None:  # on a terminal the line is erased: the pass's summary takes its place
        if self.terminal and self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


# --------------------------------------------------------------------------- signals and files


SIGHUP = getattr(signal, "SIGHUP", None)  # Windows has none
STOP_SAID = ("the stop is said",)  # run_script's KeyboardInterrupt: the program said why it stops


def stop_signals() -> list[signal.Signals]:
    """SIGINT, SIGTERM and SIGHUP (a closed terminal or ssh connection; not on Windows), but none ignored at the start:
    `nohup` ignores SIGHUP, a shell script's background job SIGINT (the run is to outlive the terminal, or a Ctrl-C)."""
    signals = [signal.SIGINT, signal.SIGTERM, SIGHUP]
    return [sig for sig in signals if sig is not None and signal.getsignal(sig) != signal.SIG_IGN]


def handling(handler: Callable) -> contextlib.ExitStack:
    """`handler` for each of stop_signals; the handlers before are put back when the `with` block this enters ends.
    Off the main thread (a program's own thread running main()), where Python takes no handler: none."""
    restore = contextlib.ExitStack()
    for sig in stop_signals() if threading.current_thread() is threading.main_thread() else []:
        restore.callback(signal.signal, sig, signal.signal(sig, handler))
    return restore


class StopSignal(contextlib.AbstractContextManager):
    """Turns the first of stop_signals into a request to save and stop at the next step (`received`); a second
    signal, or the first one once `at_once` is set, raises KeyboardInterrupt where the program is."""
    received: signal.Signals | None = None
    at_once = False

    def __enter__(self) -> "StopSignal":
        self.script = any(signal.getsignal(sig) is interrupt for sig in stop_signals())  # run_script's process
        self.restore = handling(self.handle)
        return self

    def handle(self, signum, frame) -> None:
        second = self.received is not None
        self.received = self.received or signal.Signals(signum)
        if second or self.at_once:
            interrupt(signum, frame)

    def __exit__(self, *exc) -> None:
        """The handlers before are put back, but a script's process stopping for a signal ignores further ones: a
        second Ctrl-C after the state is saved would only cut its exit short (its lock, its temporary files left)."""
        if self.received is not None and self.script:
            ignore_stop_signals()
        else:
            self.restore.close()


@contextlib.contextmanager
def stops_held():
    """A stop signal coming while the block runs (on the main thread) is held, then sent again to the handler put back
    as it ends: for work an exception half-way would leave broken, such as a process pool starting its processes."""
    held: list[int] = []
    try:
        with handling(lambda signum, frame: held.append(signum)):
            yield
    finally:
        for sig in held[-1:]:  # the last, as a second signal ends a run as itself
            signal.raise_signal(sig)


def ignore_stop_signals() -> None:
    for sig in stop_signals():
        signal.signal(sig, signal.SIG_IGN)


def signal_of(interrupt: KeyboardInterrupt) -> signal.Signals:
    """The stop signal a KeyboardInterrupt stands for: the one it names (StopSignal, run_script), else SIGINT."""
    return next((arg for arg in interrupt.args if isinstance(arg, signal.Signals)), signal.SIGINT)


def interrupt(signum: int, frame) -> None:
    """A stop signal as Ctrl-C: a KeyboardInterrupt naming it; further ones are ignored (they'd cut the exit short)."""
    ignore_stop_signals()
    raise KeyboardInterrupt(signal.Signals(signum))


def run_script(main: Callable[[], None]) -> None:
    """A script run as a program (`if __name__ == "__main__"`; main() from a program leaves its handlers as they were).
    SIGTERM and SIGHUP, as Ctrl-C, raise a KeyboardInterrupt (report_errors says it in a line; a file being written is
    removed), unless a StopSignal takes them. A stop by signal N (exit 128 + N) then ignores further ones and, at
    SIGINT, ends as Python's Ctrl-C: killed by it after a clean exit, so a shell loop stops (bash goes on at 130)."""
    for sig in stop_signals():
        signal.signal(sig, interrupt)
    sys.unraisablehook = functools.partial(stop_where_raised, sys.unraisablehook)
    try:
        main()
    except (SystemExit, KeyboardInterrupt) as end:
        code = end.code if isinstance(end, SystemExit) else 128 + signal_of(end)  # a second signal in the exit
        if not isinstance(code, int) or code - 128 not in (signal.SIGINT, signal.SIGTERM, SIGHUP):
            raise
        ignore_stop_signals()
        if code != 128 + signal.SIGINT:
            sys.exit(code)
        sys.excepthook = quiet_stop
        raise KeyboardInterrupt(*STOP_SAID) from None


def stop_where_raised(previous: Callable, unraisable) -> None:
    """sys.unraisablehook in a script: interrupt's KeyboardInterrupt raised where Python drops it (an os.fork hook, a
    __del__) left the run deaf to every stop signal; the signal is sent again once that code is done, from a thread."""
    value = unraisable.exc_value
    if not (isinstance(value, KeyboardInterrupt) and any(isinstance(a, signal.Signals) for a in value.args)):
        previous(unraisable)  # a signal's handler runs on the main thread only: so does its dropped exception
        return
    sig = signal_of(value)
    signal.signal(sig, interrupt)  # interrupt() ignored it, with the others, before its exception was dropped
    resend = (functools.partial(signal.pthread_kill, threading.main_thread().ident) if hasattr(signal, "pthread_kill")
              else _thread.interrupt_main)  # a real signal wakes a blocked wait; Windows has none to send a thread
    threading.Timer(0.01, resend, (sig,)).start()


def quiet_stop(kind: type, value: BaseException, traceback) -> None:
    """sys.excepthook once run_script ends at a Ctrl-C: its KeyboardInterrupt prints no traceback, others do."""
    if not (kind is KeyboardInterrupt and value.args == STOP_SAID):
        sys.__excepthook__(kind, value, traceback)


def write_atomically(path: str | os.PathLike, write: Callable[[io.BufferedWriter], object]) -> None:
    """`write` fills a synced temporary file beside `path`, which then replaces it: a failure, a signal or a kill
    mid-write leaves the old file. The temporary file, named with the writer's pid, is removed on failure (a killed
    writer's by the next write of `path`); writers at once each write their own, the last rename wins. A failure raises
    its OSError or KeyboardInterrupt, also those torch.save wraps in a RuntimeError (a full disk, a Ctrl-C)."""
    directory, name = os.path.split(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = temporary_file(directory, name)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:  # it may hold gigabytes
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, RuntimeError) and isinstance(e.__context__, (OSError, KeyboardInterrupt)):
            raise e.__context__ from None
        raise


def temporary_file(directory: str, name: str) -> tuple[int, str]:
    """A new file for `name` in `directory`, open to write, named with this process's pid; a dead writer's go first
    (they may be large). Made with the usual permissions (not mkstemp's 0600) by the system's umask: reading the
    umask means setting it, which another thread creating a file then would take (a checkpoint writer's, a cache's)."""
    own = re.compile(rf"\.{re.escape(name)}\.(\d+)-\w+\.tmp")
    for entry in os.scandir(directory):
        if (match := own.fullmatch(entry.name)) and not process_is_running(int(match[1])):
            Path(entry.path).unlink(missing_ok=True)
    path = os.path.join(directory, f".{name}.{os.getpid()}-{secrets.token_hex(8)}.tmp")
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), path


def process_is_running(pid: int) -> bool:
    if sys.platform != "win32":  # where os.kill's signal 0 is CTRL_C_EVENT, sent to the whole console
        try:
            os.kill(pid, 0)  # signal 0: only whether there is such a process
        except (ProcessLookupError, PermissionError) as e:  # PermissionError: another user's
            return isinstance(e, PermissionError)
        return True
    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return ctypes.get_last_error() == 5  # ERROR_ACCESS_DENIED: another user's; else there is none
    exit_code = ctypes.c_ulong()
    kernel32.GetExitCodeProcess(handle, ctypes.byref(exit_code))
    kernel32.CloseHandle(handle)
    return exit_code.value == 259  # STILL_ACTIVE


class Lock(contextlib.AbstractContextManager):
    """An exclusive lock on the file `path`, which names its holder's pid; the holder's end, even by SIGKILL, frees it.
    `taken(pid)` makes the error raised while another process holds it; a full disk raises the OSError."""
    LOCKED_BYTE = 2**20  # msvcrt locks bytes, which no other process may then read: one far past the holder's pid

    def __init__(self, path: Path, taken: Callable[[str], Exception]) -> None:
        self.path = path
        while True:
            self.file = open(path, "a+")
            try:  # flock, or on Windows msvcrt's lock of one byte: either is freed however this process ends
                if fcntl is not None:
                    fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                else:
                    os.lseek(self.file.fileno(), self.LOCKED_BYTE, os.SEEK_SET)
                    msvcrt.locking(self.file.fileno(), msvcrt.LK_NBLCK, 1)
            except (BlockingIOError, PermissionError):  # msvcrt's way of saying so is EACCES
                self.file.seek(0)
                owner = self.file.read().strip() or "unknown"
                self.file.close()
                raise taken(owner) from None
            with contextlib.suppress(FileNotFoundError):
                if os.path.samestat(os.fstat(self.file.fileno()), os.stat(path)):
                    break
            # The file was opened just before its holder removed it: locking it excludes no one, since the next
            # process creates and locks a new file at `path`. Lock what is at `path` now.
            self.file.close()
        try:
            self.file.truncate(0)
            self.file.write(str(os.getpid()))
            self.file.flush()
        except OSError:  # a full disk: no lock file is left behind, the caller words the error
            self.__exit__()
            raise

    def __exit__(self, *exc) -> None:
        try:
            self.path.unlink(missing_ok=True)  # while still locked: no other process can be holding it
        except PermissionError:  # Windows removes no open file: closed first; then one another run opened stays
            self.file.close()
            with contextlib.suppress(PermissionError):
                self.path.unlink(missing_ok=True)
        self.file.close()


def special_kind(mode: int) -> str:  # of a file that is no regular file, folder or link
    kinds = {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFIFO: "a FIFO",
             stat.S_IFSOCK: "a socket"}
    return kinds.get(stat.S_IFMT(mode), "a special file")


def check_tilde_expanded(flag: str, path: Path) -> None:
    """`--grid=~/g.png`, `--root=~/data`: bash expands no ~ after a '=', and the write would make a folder named ~."""
    if Path(path).parts[:1] == ("~",) and not Path("~").exists():
        raise UsageError(f"{flag} {path}: starts with a ~ the shell did not expand (it would make a folder named ~ "
                         f"here); write {flag} {path} with a space after {flag}, or $HOME for ~")


def check_writable_file(flag: str, path: Path, example: str, what: str = "a file", make_folder: bool = False) -> None:
    """Fail before the long work, not after it, when `flag`'s file cannot be written: a real write in the nearest
    folder that exists; a missing folder is made only with `make_folder` (else by the write, so a run that fails
    first leaves none). `example`: a file name for the advice when `path` is a folder; `what`: what `flag` wants."""
    check_tilde_expanded(flag, path)
    try:  # one stat: a name too long, a link loop, a folder above that cannot be searched are one line here
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):  # to be made; a file on the way is named below
        mode = None
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot reach it ({e.strerror or e}); choose another {flag}") from None
    if mode is not None and stat.S_ISDIR(mode):
        raise UsageError(f"{flag} {path}: is a folder; pass {what} in it, e.g. {flag} {path / example}")
    if mode is not None and not stat.S_ISREG(mode):  # the write-then-rename would replace a device node or FIFO
        raise UsageError(f"{flag} {path}: is {special_kind(mode)}, not a regular file, and "
                         f"writing would replace it; pass {what} path, e.g. {flag} {path.parent / example}")
    folder = next(folder for folder in path.parents if folder.exists())  # the nearest; "." and "/" exist
    if not folder.is_dir():  # mkdir's "File exists" would not say which file is in the way
        raise UsageError(f"{flag} {path}: {folder} is a file, not a folder; choose another {flag}")
    try:
        if make_folder:
            path.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path.parent if make_folder else folder).close()  # permissions miss a read-only mount
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot write in {path.parent} ({e.strerror or e}); "
                         "choose a writable folder") from None


# --------------------------------------------------------------------------- checkpoints written in the background


def to_cpu(obj, reuse=None):
    """A copy of a checkpoint with every tensor on the CPU: training may go on changing the originals. `reuse`, an
    earlier copy no longer needed, lends tensors of like shape and dtype (copying into used memory: half the time)."""
    if isinstance(obj, torch.Tensor):
        if isinstance(reuse, torch.Tensor) and (reuse.shape, reuse.dtype) == (obj.shape, obj.dtype):
            return reuse.copy_(obj.detach())
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        reuse = reuse if isinstance(reuse, dict) else {}
        return {key: to_cpu(value, reuse.get(key)) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        reuse = reuse if isinstance(reuse, (list, tuple)) and len(reuse) == len(obj) else [None] * len(obj)
        return type(obj)(to_cpu(value, old) for value, old in zip(obj, reuse))
    return obj


class CheckpointWriter(contextlib.AbstractContextManager):
    """Writes checkpoints with `write` on a background thread, so training does not wait for the disk.
    `save_together({path: checkpoint, ...})` copies to the CPU at once (the state at the call) and returns; the files
    are written in that order, no other write between them. A save drops its path's copy not yet being written and
    copies into its memory (or the last written copy's): at most two copies per path, however slow the disk. `wait`
    blocks until all is on disk; it and the next save raise a write's error. The `with` block's end writes the rest."""

    def __init__(self, write: Callable[[dict, str], object]) -> None:
        self.write = write  # (checkpoint, path): e.g. torch.save through write_atomically
        self.lock = threading.Lock()  # guards pending and spare
        self.pending: dict[str, dict] = {}  # path -> its newest copy not yet being written, in order of saving
        self.spare: dict[str, dict] = {}  # path -> a written copy, whose memory the next save of that path reuses
        self.error: BaseException | None = None
        self.written: set[str] = set()  # the paths written so far
        self.handed = queue.Queue()  # a token per copy handed over: its write, or none if a newer one replaced it
        self.thread = threading.Thread(target=self.run, name="checkpoint-writer", daemon=True)
        self.thread.start()

    def run(self) -> None:
        for _ in iter(self.handed.get, None):  # None: the `with` block ended
            with self.lock:
                path = next(iter(self.pending), None)
                checkpoint = self.pending.pop(path, None)
            try:
                if checkpoint is not None and self.error is None:
                    self.write(checkpoint, path)
                    self.written.add(path)
            except BaseException as e:  # handed to the training thread at its next save or wait
                self.error = e
            with self.lock:
                if checkpoint is not None:
                    self.spare[path] = checkpoint
            self.handed.task_done()

    def save_together(self, files: dict) -> None:
        self.raise_error()
        files = {os.fspath(path): checkpoint for path, checkpoint in files.items()}
        with self.lock:
            reuse = {path: self.pending.pop(path, None) or self.spare.pop(path, None) for path in files}
        copies = {path: to_cpu(checkpoint, reuse[path]) for path, checkpoint in files.items()}
        with self.lock:
            self.pending.update(copies)
        for _ in copies:
            self.handed.put(True)

    def wait(self) -> None:
        self.handed.join()
        self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def __exit__(self, kind, value, traceback) -> None:  # by an error too, every saved checkpoint reaches the disk
        self.handed.put(None)
        self.thread.join()
        self.spare.clear()
        if kind is None:
            self.raise_error()


# --------------------------------------------------------------------------- the run: its processes and its code


TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # what torchrun sets with WORLD_SIZE


class Processes:
    """The processes torchrun started (one without it): rank, device, the few collectives used. `--batch-size` is
    global: each process takes its share (rank, rank + world, ...) of each batch. Host values (the stop flag, the resume
    state, barriers) go over gloo: over NCCL, reading a CUDA tensor back would wait for all queued on the GPU."""

    def __init__(self, device_name: str | None) -> None:
        self.world, self.rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        self.main = self.rank == 0
        # under torchrun, with one process too: the NCCL (gloo) and DDP code path, testable on a machine of one GPU
        self.distributed = "WORLD_SIZE" in os.environ
        missing = [name for name in TORCHRUN_VARIABLES if self.distributed and name not in os.environ]
        if missing:  # torch's own error is a traceback ("... RANK expected")
            raise UsageError(f"WORLD_SIZE is set but {', '.join(missing)} not, as outside torchrun: start with "
                             "torchrun, or unset WORLD_SIZE")
        self.device = resolve_device(device_name)
        self.host_group = None  # the default group when that is gloo already
        if self.distributed:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            if dist.get_backend() != "gloo":
                self.host_group = dist.new_group(backend="gloo")

    def share(self) -> slice:
        return slice(self.rank, None, self.world)

    def reduce(self, tensor: torch.Tensor, largest: bool = False, group=None) -> torch.Tensor:  # sum, or largest
        if self.world > 1:
            dist.all_reduce(tensor, dist.ReduceOp.MAX if largest else dist.ReduceOp.SUM, group=group)
        return tensor

    def any(self, flag: bool) -> bool:
        """Whether any process has the flag set (a signal to one stops all at one step); waits on hosts, not GPUs."""
        if self.world == 1:  # asked at every training step: no tensor, no read-back for one process
            return flag
        return bool(self.reduce(torch.tensor([float(flag)]), largest=True, group=self.host_group).item())

    def gather(self, obj) -> list:
        gathered = [obj] * self.world
        if self.world > 1:
            dist.all_gather_object(gathered, obj, group=self.host_group)
        return gathered

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.host_group)

    def close(self) -> None:
        if self.distributed:
            dist.destroy_process_group()


@functools.cache
def code_version() -> str:
    """The code a run used (in its checkpoints, log and test report): the git commit of this project's checkout
    (`-dirty` if tracked files differ), else (no git, no commit, the scripts copied elsewhere) a hash of the scripts."""
    here = Path(__file__).resolve().parent

    def git(*command: str) -> str:
        return subprocess.run(["git", *command], cwd=here, capture_output=True, text=True).stdout.strip()
    with contextlib.suppress(OSError):  # no git
        commit = git("describe", "--always", "--dirty", "--exclude=*")
        if commit and Path(git("rev-parse", "--show-toplevel")).resolve() == here:
            return f"commit {commit}"
    digest = hashlib.sha256()
    for script in sorted(here.glob("*.py")):
        digest.update(script.name.encode() + b"\0" + script.read_bytes())
    return f"scripts sha256 {digest.hexdigest()[:12]}"


def has_bf16_units(device: torch.device) -> bool:
    """CUDA, or a CPU that computes bf16 natively (AMX, or AVX512-BF16 as on AMD EPYC): there bf16 trains faster than
    fp32 (benchmarks/README.md; an EPYC with AVX512-BF16, no AMX: 66 images/s against 37). MPS trains in fp32."""
    return device.type == "cuda" or (device.type == "cpu" and any(
        getattr(torch.cpu, name, bool)() for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")))


def tune_for_training() -> None:
    """For the process's life: cuDNN times its convolutions once (fixed shapes); glibc keeps freed blocks over 32 MB for
    the next step, not mapped anew and zeroed (a third of a CPU step; benchmarks/README.md). Elsewhere: as it was."""
    torch.backends.cudnn.benchmark = True
    with contextlib.suppress(OSError, AttributeError):  # no libc.so.6 (macOS, Windows, musl)
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX: no block mapped on its own
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: the free memory at the heap's top stays


def compiled(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """torch.compile's inductor builds C++, and on CUDA Triton builds its launcher in C with Python's headers: without
    a working compiler, or Python.h (no python3-dev), the first step was a 100-line traceback. Checked up front, as
    inductor and Triton look for them; the run then trains eager, with a warning."""
    from torch._inductor import cpp_builder, exc
    scheme = sysconfig.get_default_scheme()  # Debian's posix_local names /usr/local, not where python3-dev puts them
    headers = Path(sysconfig.get_paths("posix_prefix" if scheme == "posix_local" else scheme)["include"], "Python.h")
    missing = ""
    if device.type == "cuda" and not headers.is_file():
        missing = f"no {headers}, which Triton needs on CUDA (install python3-dev)"
    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        missing = "no working C++ compiler for torch.compile (install g++, or name one in CXX)"
    if missing:
        print(f"warning: --compile: {missing}; training without it", file=sys.stderr)
        return net
    return torch.compile(net)
