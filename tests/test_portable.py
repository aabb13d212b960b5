"""macOS, Windows and Python 3.14's forkserver, simulated on Linux: the scripts run under a sitecustomize.py that takes
away what those systems lack; and the code's other paths for them, with the system calls faked."""
import ctypes
import errno
import fcntl
import functools
import inspect
import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import types

import pytest
import torch

import cli
import data
import conftest
from conftest import QUICK, ROOT, bare_environment, make_class_folders


def locking(fd, mode, nbytes):
    """msvcrt.locking faked with record locks, which are like Windows' byte locks: from the file's position, EACCES
    when another process holds them."""
    command = fcntl.LOCK_UN if mode == 0 else fcntl.LOCK_EX | fcntl.LOCK_NB
    try:
        fcntl.lockf(fd, command, nbytes, os.lseek(fd, 0, os.SEEK_CUR))
    except BlockingIOError:
        raise PermissionError(errno.EACCES, "Permission denied") from None


MSVCRT = types.SimpleNamespace(LK_UNLCK=0, LK_NBLCK=2, locking=locking)
LINUX_ONLY = "import os\ndel os.sched_getaffinity, os.posix_fallocate\n"
SHIMS = {
    "macos": LINUX_ONLY + "import multiprocessing\nmultiprocessing.set_start_method('spawn', force=True)\n",
    # no fcntl (the lock is msvcrt's, faked), no SIGHUP, SIGPIPE or SIGKILL, no fchmod (before Python 3.13);
    # subprocess is imported first: to it, a msvcrt module means Windows
    "windows": LINUX_ONLY + "import errno, fcntl, signal, subprocess, sys, types\n" + inspect.getsource(locking)
    + textwrap.dedent("""
        del os.fchmod, signal.SIGHUP, signal.SIGPIPE, signal.SIGKILL
        sys.modules["msvcrt"] = types.SimpleNamespace(LK_UNLCK=0, LK_NBLCK=2, locking=locking)

        class NoFcntl:
            def find_spec(self, name, path=None, target=None):
                if name == "fcntl":
                    raise ModuleNotFoundError("No module named 'fcntl'", name=name)

        sys.modules.pop("fcntl")
        sys.meta_path.insert(0, NoFcntl())
        """),
    "forkserver": "import multiprocessing\nmultiprocessing.set_start_method('forkserver', force=True)\n",
}


# The scripts one after another in one interpreter, each run as Python runs a script file (its folder first on the
# path, __main__, its argv), its stdout after a line naming it: the shim is what is tested, not a new Python each.
RUN_SCRIPTS = textwrap.dedent("""
    import json, os, runpy, sys
    for argv in json.loads(sys.argv[1]):
        print("=== " + os.path.basename(argv[0]), flush=True)
        sys.argv, sys.path[0] = argv, os.path.dirname(argv[0])
        runpy.run_path(argv[0], run_name="__main__")
    """)


@pytest.mark.slow  # three scripts in a new interpreter
@pytest.mark.parametrize("system", SHIMS)
def test_download_pretrain_and_predict_run_without_what_linux_alone_has(tmp_path, system):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SHIMS[system])
    source = make_class_folders(tmp_path / "source", train=100, test=2, size=8)  # 300: two decoding processes
    scripts = [["download.py", "--source", source, "--root", "data"],
               ["pretrain.py", "--data-dir", "data", "--out", "ck/p.pt", "--epochs", "1", "--limit", "48",
                "--val-size", "6", *QUICK],
               ["predict.py", "data/test/red", "--checkpoint", "ck/p.pt", "--device", "cpu"]]
    argvs = json.dumps([[str(ROOT / name), *map(str, args)] for name, *args in scripts])
    result = subprocess.run([sys.executable, "-c", RUN_SCRIPTS, argvs], cwd=tmp_path, capture_output=True, text=True,
                            env=bare_environment(PYTHONPATH=str(shim), HOME=str(tmp_path)))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    _, downloaded, started, predicted = result.stdout.split("=== ")
    assert downloaded.startswith("download.py\n") and "pretrain: 42 training, 6 validation, 6 test images" in started
    assert (tmp_path / "data" / ".cache" / "train.json").is_file()
    lines = predicted.splitlines()[1:]
    assert [line.split("\t")[0] for line in lines[:2]] == ["data/test/red/0000.png", "data/test/red/0001.png"]


def test_an_older_python_is_told_in_one_line_before_anything_fails(monkeypatch):
    monkeypatch.setattr(sys, "version_info", (3, 9, 18, "final", 0))
    monkeypatch.setattr(sys, "argv", [str(ROOT / "predict.py")])
    with pytest.raises(SystemExit) as exit:
        exec(compile((ROOT / "cli.py").read_text(), "cli.py", "exec"), {"__name__": "cli"})
    assert exit.value.code == "predict.py: needs Python 3.10 or newer, this is 3.9"
    for script in ("download.py", "predict.py", "pretrain.py", "finetune.py", "data.py"):  # cli.py is imported first
        ours = [line.split()[1] for line in (ROOT / script).read_text().splitlines()
                if line.startswith(("import ", "from ")) and (ROOT / f"{line.split()[1]}.py").is_file()]
        assert ours[0] == "cli", script


# torch 2.7, as far as the scripts meet it: an older version, and no torch.export.passes (imported as None: an
# ImportError); run as Python runs a script file.
OLDER_TORCH = textwrap.dedent("""
    import os, runpy, sys, torch
    torch.__version__ = torch.torch_version.TorchVersion("2.7.1+cu126")
    sys.modules["torch.export.passes"] = None
    sys.argv, sys.path[0] = sys.argv[1:], os.path.dirname(sys.argv[1])
    runpy.run_path(sys.argv[0], run_name="__main__")
    """)


@pytest.mark.slow  # a new interpreter, for a torch that imports differently
def test_an_older_torch_is_told_in_one_line_not_an_import_error(tmp_path):
    result = subprocess.run([sys.executable, "-c", OLDER_TORCH, str(ROOT / "predict.py"), "cat.png"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert (result.returncode, result.stderr) == (1, "predict.py: needs torch 2.8 or newer, this is 2.7.1+cu126; "
                                                     "upgrade torch and torchvision as requirements.txt says\n")


@pytest.mark.parametrize("version", ["2.8.0a0+5228986c39.nv25.06", "2.8.0rc1", "2.10.0", "2.11.0+cu130"])
def test_a_torch_of_2_8_or_newer_is_taken_a_pre_release_or_build_of_it_too(monkeypatch, version):
    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion(version))
    exec(compile((ROOT / "cli.py").read_text(), "cli.py", "exec"), {"__name__": "cli"})  # no SystemExit


def hold_lock(path, ready, done) -> None:
    with cli.Lock(path, RuntimeError):
        ready.set()
        done.wait(60)


def test_without_fcntl_the_lock_is_msvcrts_and_keeps_another_process_out_until_it_ends(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "fcntl", None)
    monkeypatch.setattr(cli, "msvcrt", MSVCRT, raising=False)
    path = tmp_path / ".out.lock"
    fork = multiprocessing.get_context("fork")
    ready, done = fork.Event(), fork.Event()
    holder = fork.Process(target=hold_lock, args=(path, ready, done))
    holder.start()
    assert ready.wait(60)
    with pytest.raises(RuntimeError, match=f"^{holder.pid}$"):
        cli.Lock(path, RuntimeError)
    done.set()
    holder.join(60)
    with cli.Lock(path, RuntimeError):
        assert path.read_text() == str(os.getpid())
    assert not path.exists()


def test_free_memory_without_proc_is_half_the_host_memory_so_a_large_set_streams(monkeypatch):
    monkeypatch.setattr(cli, "linux_available_memory", lambda: None)  # macOS: no /proc, no count of free pages
    half = cli.free_memory(torch.device("cpu"))
    assert 0 < half < 2**50
    images = data.ImageSet(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.zeros(1, dtype=torch.int64), ["a"])
    monkeypatch.setattr(data.ImageSet, "nbytes", half + 1)
    assert data.place(images, torch.device("cpu"), "auto").device is not None  # streamed


def test_free_memory_where_nothing_tells_it_is_none_so_every_set_streams(monkeypatch):
    monkeypatch.setattr(cli, "linux_available_memory", lambda: None)
    monkeypatch.delattr(os, "sysconf")  # Windows
    assert cli.free_memory(torch.device("cpu")) == 0


@pytest.mark.parametrize("libc", [OSError("libc.so.6: cannot open shared object file"), types.SimpleNamespace()],
                         ids=["no libc.so.6", "no mallopt"])
def test_without_glibc_a_training_starts_with_the_allocator_as_it_was(monkeypatch, libc):
    """macOS, Windows and musl have no libc.so.6 (OSError); a C library without mallopt (AttributeError)."""
    def cdll(name):
        if isinstance(libc, Exception):
            raise libc
        return libc
    monkeypatch.setattr(ctypes, "CDLL", cdll)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    cli.tune_for_training()
    assert torch.backends.cudnn.benchmark


def test_a_process_on_windows_is_looked_up_not_sent_signal_0(monkeypatch):
    """There os.kill(pid, 0) sends CTRL_C_EVENT to every process of the console."""
    exit_codes = {10: 259, 11: 0}  # STILL_ACTIVE, ended

    class Kernel32:
        @staticmethod
        def OpenProcess(access, inherit, pid):
            return pid if pid in exit_codes else 0

        @staticmethod
        def GetExitCodeProcess(handle, pointer):
            pointer._obj.value = exit_codes[handle]

        @staticmethod
        def CloseHandle(handle):
            pass
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(cli.os, "kill", lambda *a: pytest.fail("os.kill on Windows"))
    monkeypatch.setattr(cli.ctypes, "WinDLL", lambda name, use_last_error: Kernel32, raising=False)
    monkeypatch.setattr(cli.ctypes, "get_last_error", lambda: 87, raising=False)  # ERROR_INVALID_PARAMETER: none
    assert [cli.process_is_running(pid) for pid in (10, 11, 12)] == [True, False, False]


def test_another_users_process_is_running_though_it_cannot_be_signalled(monkeypatch):
    """os.kill(pid, 0) on another user's process is EPERM: it is running, its temporary file is not removed."""
    def kill(pid, sig):
        raise PermissionError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(cli.os, "kill", kill)
    assert cli.process_is_running(1)


def test_without_posix_fallocate_the_image_file_is_written_out_and_a_full_disk_is_one_line(
        tmp_path, monkeypatch, small_filesystem):
    monkeypatch.delattr(data.os, "posix_fallocate")
    path, beside = data.new_image_file(tmp_path / "train.u8", (5, 3, 1000, 1000))
    assert beside and path.read_bytes() == bytes(15_000_000)
    monkeypatch.setattr(data.tempfile, "tempdir", str(small_filesystem("4m")))
    with pytest.raises(cli.DataError, match=r"cannot hold the decoded images \(No space left on device, 0.0 GB\)"):
        data.new_image_file(None, (1, 3, 1500, 1500))
    assert not list(small_filesystem.mounted[0].iterdir())


def test_a_closed_stdout_without_sigpipe_ends_predict_quietly_too(monkeypatch):
    import predict
    monkeypatch.delattr(signal, "SIGPIPE")  # Windows
    stdout = cli.Output(io.StringIO())
    stdout.lost = BrokenPipeError()
    monkeypatch.setattr(sys, "stdout", stdout)
    with pytest.raises(SystemExit) as exit:
        predict.check_results_written()
    assert exit.value.code == 128 + 13


def test_a_stream_without_a_file_descriptor_is_guarded_where_nothing_asks_where_writing_starts(monkeypatch):
    """An IDE's console or a logger's proxy writes but has no fileno(): only a `whole` stdout asks for it."""
    class Console:
        def __init__(self):
            self.text = ""

        def write(self, text):
            self.text += text
            return len(text)

    console = Console()
    monkeypatch.setattr(sys, "stdout", console)
    monkeypatch.setattr(sys, "stderr", console)
    cli.guard_output()
    print("epoch 1")
    assert isinstance(sys.stdout, cli.Output) and console.text == "epoch 1\n"


def test_a_drive_letter_is_a_path_not_a_url():
    assert not data.URL.match("C:/data/cifar10") and data.URL.match("s3:/bucket/x")


def test_task_commands_are_quoted_for_the_shell_invoke_runs(monkeypatch):
    import tasks
    words = ["/p y/python", "it's.png"]
    assert tasks.command_line(words) == "'/p y/python' 'it'\"'\"'s.png'"
    monkeypatch.setattr(sys, "platform", "win32")  # cmd.exe: single quotes are letters
    assert tasks.command_line(words) == "\"/p y/python\" it's.png"


@pytest.mark.parametrize("files, cores", [({"cpu.max": "150000 100000"}, 2), ({"cpu.max": "max 100000"}, 64),
                                          ({"cpu/cpu.cfs_quota_us": "50000", "cpu/cpu.cfs_period_us": "100000"}, 1),
                                          ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, 64)],
                         ids=["cgroup v2", "v2, no quota", "cgroup v1", "v1, no quota"])
def test_the_suite_starts_a_worker_per_core_a_containers_cpu_quota_allows(tmp_path, monkeypatch, files, cores):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)  # a 64-core host
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text + "\n")
    monkeypatch.setattr(conftest, "usable_cores", functools.partial(conftest.usable_cores, cgroup=tmp_path))
    monkeypatch.delenv("PYTEST_XDIST_AUTO_NUM_WORKERS", raising=False)
    assert conftest.pytest_xdist_auto_num_workers(None) == cores
    monkeypatch.setenv("PYTEST_XDIST_AUTO_NUM_WORKERS", "3")  # a count the user gives: xdist reads it itself
    assert conftest.pytest_xdist_auto_num_workers(None) is None
