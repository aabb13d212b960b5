import importlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from unittest import mock

from invoke.main import program
import pytest
import torch

import cli
from conftest import QUICK, ROOT, default_signals, make_class_folders, stopped_status
from model import load_checkpoint


def invoke(*args, cwd):
    return subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(ROOT), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)


@pytest.fixture
def invoke_here(capfd, monkeypatch):
    """invoke(...) in this process: invoke's Program reads tasks.py here, with the argv, folder and environment of
    `python -m invoke` and put back after; the steps' scripts are still processes, their output read at fds 1 and 2.
    A new invoke costs seconds of importing torch (`invoke all` reads the scripts' parsers) and tests nothing more."""
    def run_invoke(*args, cwd):
        monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", ["invoke", "--search-root", str(ROOT), *map(str, args)])
        monkeypatch.delitem(sys.modules, "tasks", raising=False)  # invoke loads tasks.py afresh under that name
        capfd.readouterr()
        with mock.patch.dict(os.environ):
            try:
                program.run(sys.argv)
                code = 0
            except SystemExit as e:
                code = e.code
        return subprocess.CompletedProcess(sys.argv, code or 0, *capfd.readouterr())
    return run_invoke


def test_tasks_are_listed(tmp_path, invoke_here):
    listing = invoke_here("--list", cwd=tmp_path).stdout
    for name in ("download", "pretrain", "finetune", "predict", "export", "all", "bench", "headline", "test"):
        assert f"\n  {name} " in listing


@pytest.mark.slow  # a real invoke process
def test_all_runs_the_whole_job(tiny_data, tmp_path):
    result = invoke("all", "--source", tiny_data, "--data-dir", tmp_path / "data", "--out-dir", tmp_path / "ck",
                    "--epochs", "1", "--image-size", "64", "--batch-size", "8", "--hidden", "64,32", "--device", "cpu",
                    cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    outputs = ("pretrain.pt", "pretrain.csv", "pretrain.test.json", "finetune.pt", "finetune.test.json",
               "predictions.png", "pretrain.png", "pretrain.confusion.png", "finetune.png", "finetune.confusion.png",
               "mistakes.png")
    for name in outputs:
        assert (tmp_path / "ck" / name).is_file(), name
    assert torch.load(tmp_path / "ck" / "finetune.pt", weights_only=True)["stage"] == "finetune"
    assert "18 labelled images: accuracy" in result.stdout


@pytest.mark.slow  # a real script process
def test_all_stops_at_the_first_failing_step(tmp_path, invoke_here):
    result = invoke_here("all", "--source", tmp_path / "missing", "--data-dir", tmp_path / "data",
                    "--out-dir", tmp_path / "ck", cwd=tmp_path)
    assert result.returncode != 0 and "no such file or folder" in result.stderr
    assert "pretrain.py" not in result.stdout + result.stderr and not (tmp_path / "ck").exists()


def test_finetune_task_passes_its_flags(tmp_path, invoke_here):
    result = invoke_here("--dry", "finetune", "--new-head", "--mode", "full", "--out", "ck/f.pt", "--ema", "0.9",
                    cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"{ROOT / 'finetune.py'} --out ck/f.pt --ema 0.9 --mode full --new-head\n" in result.stderr


@pytest.mark.parametrize("name", ["download", "pretrain", "finetune", "predict", "export", "bench", "headline"])
def test_every_script_flag_is_a_task_flag(name, monkeypatch):
    import tasks
    flags = {flag for argument in getattr(tasks, name).get_arguments() for flag in argument.names}
    monkeypatch.syspath_prepend(ROOT / "benchmarks")
    parser = importlib.import_module({"bench": "throughput"}.get(name, name)).build_parser()
    dests = {action.dest.replace("_", "-") for action in parser._actions if action.dest != "help"}
    assert flags == dests
    if name in ("download", "pretrain", "finetune"):  # invoke all takes every flag of theirs, each its name
        all_flags = {flag for argument in tasks.all_.get_arguments() for flag in argument.names}
        assert dests - {"root", "data-dir", "out", "checkpoint"} <= all_flags


def test_all_passes_the_downloads_flags_to_it(tmp_path, invoke_here):
    result = invoke_here("--dry", "all", "--source", "photos", "--test-size", "7", "--md5", "0" * 32, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"{ROOT / 'download.py'} --root data/cifar10 --source photos --md5 {'0' * 32} --test-size 7\n" in (
        result.stderr)


def test_a_benchmarks_parser_is_read_with_its_folder_put_on_the_path(monkeypatch):
    """invoke puts tasks.py's folder on the path, not benchmarks/, whose scripts import each other by name."""
    import tasks
    monkeypatch.setattr(sys, "path", [p for p in sys.path if Path(p) != ROOT / "benchmarks"])
    monkeypatch.delitem(sys.modules, "throughput", raising=False)
    assert tasks.script_parsers(["bench"])["bench"].prog == "throughput.py"
    assert str(ROOT / "benchmarks") in sys.path


def test_the_test_task_runs_pytest(tmp_path, invoke_here):
    result = invoke_here("--dry", "test", cwd=tmp_path)
    assert result.returncode == 0 and result.stderr.split()[-2:] == ["-m", "pytest"]


@pytest.mark.slow  # a real script process
def test_a_value_invokes_parser_would_refuse_reaches_the_script(tmp_path, invoke_here):
    result = invoke_here("predict", "--limit", "", "--paths", tmp_path, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "argument --limit: invalid positive_int value: ''" in result.stderr


@pytest.mark.slow  # a real script process
def test_relative_paths_are_the_callers_and_the_command_shown_is_plain_text_on_stderr(tiny_data, tmp_path,
                                                                                      invoke_here):
    result = invoke_here("download", "--source", tiny_data, "--root", "here", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "here" / "train" / "red").is_dir() and not (ROOT / "here").exists()
    assert result.stderr.startswith(f"{sys.executable} {ROOT / 'download.py'} --root here --source {tiny_data}\n")
    assert "download.py" not in result.stdout and "\x1b" not in result.stderr


def test_invoke_dies_of_sigint_only_after_a_script_killed_by_it(monkeypatch):
    """A script killed by SIGINT (-2, cli.run_script's end at Ctrl-C) and one that exited 130 are told apart."""
    import tasks
    from invoke import Context, Exit
    registered = []
    monkeypatch.setattr(tasks.atexit, "register", registered.append)
    for status, code, dies in ((130, 130, False), (-signal.SIGINT, 130, True), (-signal.SIGTERM, 143, False)):
        registered.clear()
        monkeypatch.setattr(tasks, "run_passing_signals", lambda words, cwd: status)
        with pytest.raises(Exit) as ended:
            tasks.run_shown(Context(), ["x"])
        assert ended.value.code == code and (registered == [tasks.die_of_sigint]) == dies


@pytest.mark.slow  # a real script process, a real signal
def test_a_signal_as_a_script_starts_reaches_it(monkeypatch):
    """Before: invoke took the signals only once the script had started; one that came as it started ended invoke
    (exit 1, no line) and left the script running on its own (holding the lock of --out)."""
    import tasks
    real_popen = subprocess.Popen

    def popen_after_a_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # a stop signal arriving while the script starts
        return real_popen(*args, **kwargs)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)  # this test's process outlives it
    try:
        monkeypatch.setattr(subprocess, "Popen", popen_after_a_signal)
        status = tasks.run_passing_signals([sys.executable, "-c", "import time; time.sleep(5)"], None)
    finally:
        monkeypatch.undo()
        signal.signal(signal.SIGTERM, previous)
    assert status == -signal.SIGTERM  # killed by it at once, not ended after its 5 s


def test_all_resume_continues_each_stage_that_left_a_resume_state(tmp_path, invoke_here):
    """A resumed stage gets no --out or --checkpoint: its state's are used, and another name for them (the folder
    moved, or spelled otherwise: ck/ then $PWD/ck) was refused as a changed flag."""
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "pretrain.last.pt").write_bytes(b"")
    result = invoke_here("--dry", "all", "--resume", "--out-dir", "ck", "--epochs", "5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    pretrain, finetune = result.stderr.splitlines()[1:3]
    assert pretrain.endswith("pretrain.py --data-dir data/cifar10 --epochs 5 --resume ck/pretrain.last.pt")
    assert "--resume" not in finetune and "--checkpoint ck/pretrain.pt" in finetune
    (tmp_path / "ck" / "finetune.last.pt").write_bytes(b"")
    result = invoke_here("--dry", "all", "--resume", "--out-dir", "ck", cwd=tmp_path)
    assert result.stderr.splitlines()[2].endswith("finetune.py --data-dir data/cifar10 --resume ck/finetune.last.pt")


def test_words_after_a_double_dash_reach_the_script_and_replace_the_default_paths(tmp_path, invoke_here):
    result = invoke_here("--dry", "predict", "--topk", "3", "--", "a.png", "it's.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == f"{sys.executable} {ROOT / 'predict.py'} --topk 3 a.png 'it'\"'\"'s.png'\n"
    result = invoke_here("--dry", "all", "--", "a.png", cwd=tmp_path)
    assert result.returncode == 1 and result.stderr == ("invoke all: takes no words after --, got 'a.png'; pass flags "
                                                        "(invoke --help all)\n")


@pytest.mark.parametrize("flag", ["--out-dir", "--data-dir"])
def test_all_with_an_empty_folder_is_one_line_not_the_file_systems_root(tmp_path, flag, invoke_here):
    result = invoke_here("--dry", "all", flag, "", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == f"invoke all: {flag} is empty; pass a folder (invoke --help all)\n"


@pytest.mark.slow  # real invoke and pretrain processes, real signals
@pytest.mark.parametrize("to_group, sig", [(True, signal.SIGINT), (False, signal.SIGINT), (False, signal.SIGTERM)])
def test_a_signal_to_invoke_stops_the_script_which_saves_and_invoke_waits_for_it(tmp_path, to_group, sig):
    """Ctrl-C at a terminal (SIGINT to invoke's process group), `kill -INT`, `timeout` (SIGTERM to invoke): before,
    invoke exited at once and the script's line was lost, ignored `kill -INT`, or left the script orphaned."""
    data = make_class_folders(tmp_path / "data", train=40, size=8)
    out = tmp_path / "p.pt"
    process = subprocess.Popen([sys.executable, "-m", "invoke", "--search-root", str(ROOT), "pretrain", "--data-dir",
                                str(data), "--out", str(out), "--epochs", "50", "--val-size", "6", *QUICK],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                               start_new_session=True, preexec_fn=default_signals)  # a terminal's foreground group
    script_pid = None
    try:
        for line in process.stderr:
            if line.startswith("  epoch 1/"):
                break
        script_pid = int((tmp_path / ".p.lock").read_text())
        os.killpg(process.pid, sig) if to_group else process.send_signal(sig)
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == stopped_status(sig), stderr  # invoke ends as the script did
        assert f"pretrain.py: stopped by {sig.name} at epoch 1, step" in stderr.splitlines()[-1], stderr
        assert load_checkpoint(tmp_path / "p.last.pt")["step"] > 0 and not cli.process_is_running(script_pid)
    finally:
        process.kill()
        if script_pid is not None and cli.process_is_running(script_pid):  # an orphan: the fault this test finds
            os.kill(script_pid, signal.SIGKILL)


def test_all_parses_every_steps_flags_before_its_first_step(tmp_path, invoke_here):
    """Before: `invoke all --mode ful` downloaded and pretrained, then finetune refused the flag."""
    result = invoke_here("--dry", "all", "--mode", "ful", cwd=tmp_path)
    assert result.returncode == 2 and "download.py" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1] == ("finetune.py: error: argument --mode: invalid choice: 'ful' (choose "
                                              "from 'classifier', 'full', 'head')")


def test_predict_without_paths_says_it_reads_the_default_folder(tmp_path, invoke_here):
    result = invoke_here("--dry", "predict", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == ["invoke predict: no --paths given: data/cifar10/test (the default)",
                                          f"{sys.executable} {ROOT / 'predict.py'} data/cifar10/test"]


@pytest.mark.slow  # real download and pretrain processes
def test_a_second_invoke_all_advises_invoke_all_resume(pretrained, tiny_data, tmp_path, invoke_here):
    """Before: `invoke all` run again, its checkpoints there, advised `pretrain.py --resume ...`, not the command
    the user typed."""
    (tmp_path / "ck").mkdir()
    for path in (pretrained, pretrained.with_suffix(".last.pt")):
        shutil.copy(path, tmp_path / "ck" / path.name)
    result = invoke_here("all", "--source", tiny_data, "--data-dir", "data", "--out-dir", "ck", "--epochs", "1",
                    "--device", "cpu", cwd=tmp_path)
    typed = f"invoke --search-root {ROOT} all --source {tiny_data} --data-dir data --out-dir ck --epochs 1 --device cpu"
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"continue it with {typed} --resume (a larger --epochs trains further)" in result.stderr.splitlines()[-1]
    # a single task: its own name, --resume and the state (before: `pretrain.py --resume ...`)
    result = invoke_here("pretrain", "--data-dir", tiny_data, "--out", "ck/pretrain.pt", "--epochs", "1", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert (f"continue it with invoke --search-root {ROOT} pretrain --resume ck/pretrain.last.pt (a larger --epochs "
            "trains further)") in result.stderr.splitlines()[-1]


def test_the_advice_to_resume_names_the_invoke_command_typed(monkeypatch):
    import pretrain
    import tasks
    assert tasks.RESUME_WITH == pretrain.RESUME_WITH
    monkeypatch.setattr(sys, "argv", ["/bin/invoke", "-r", "../p", "all", "--out-dir", "c{k}", "--overwrite"])
    monkeypatch.setenv(pretrain.RESUME_WITH, tasks.resume_template("all"))
    assert pretrain.resume_advice("finetune", "c{k}/finetune.last.pt") == "invoke -r ../p all --out-dir 'c{k}' --resume"
    monkeypatch.setattr(sys, "argv", ["/bin/invoke", "-r", "../p", "pretrain", "--epochs", "3"])
    monkeypatch.setenv(pretrain.RESUME_WITH, tasks.resume_template("pretrain"))
    assert pretrain.resume_advice("finetune", "c/f.last.pt") == "invoke -r ../p finetune --resume c/f.last.pt"
    monkeypatch.delenv(pretrain.RESUME_WITH)
    assert pretrain.resume_advice("finetune", "c/f.last.pt") == "python finetune.py --resume c/f.last.pt"
    monkeypatch.setattr(sys, "argv", ["main/pre train/pretrain.py"])  # run from elsewhere: the script as named there
    assert pretrain.resume_advice("finetune", "c/f.pt") == "python 'main/pre train/finetune.py' --resume c/f.pt"
    monkeypatch.setattr(sys, "argv", ["/bin/invoke", "-r", "../p", "pretrain", "--epochs", "3"])
    odd = "o d/it's \"x\".last.pt"  # before: printed bare, which a shell splits at the space and the quotes
    assert shlex.split(pretrain.resume_advice("pretrain", odd)) == ["python", "pretrain.py", "--resume", odd]


@pytest.mark.slow  # real invoke processes
def test_listing_the_tasks_and_a_tasks_help_do_not_import_torch(tmp_path):
    """Before: `invoke --list` imported every script, and so torch, to read their flags: 4 s."""
    code = ("import sys; from invoke.main import program; program.run(sys.argv[1:], exit=False); "
            "print('torch imported' if 'torch' in sys.modules else 'no torch')")
    for args in (["--list"], ["--list"], ["--help", "pretrain"]):  # the first may read the scripts' flags afresh
        result = subprocess.run([sys.executable, "-c", code, "invoke", "--search-root", str(ROOT), *args],
                                capture_output=True, text=True, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("no torch\n") and "--lr-schedule" in result.stdout


def test_a_half_written_or_outdated_flags_cache_is_read_from_the_scripts_again(tmp_path, monkeypatch):
    """A damaged cache (a hand edit, another tool) or one made from other scripts is read from the scripts again."""
    import tasks
    monkeypatch.setattr(tasks, "FLAGS_CACHE", tmp_path / "flags.json")
    fresh = tasks.script_flags()
    whole = tasks.FLAGS_CACHE.read_text()
    outdated = whole.replace('"--lr"', '"--outdated"').replace('"key": [[', '"key": [[0, ')
    for cached in (whole[:len(whole) // 2], outdated):
        tasks.FLAGS_CACHE.write_text(cached)
        assert tasks.script_flags() == fresh and tasks.FLAGS_CACHE.read_text() == whole
    assert "--lr" in [flag for action in fresh["pretrain"] for flag in action.option_strings]


def test_the_flags_cache_is_read_from_the_scripts_again_when_one_changes_its_size_or_mtime(tmp_path, monkeypatch):
    """Its key: each .py file's name, mtime and size. A script edited is read again (not the cache's old flags)."""
    import tasks
    (tmp_path / "benchmarks").mkdir()
    for path in [*ROOT.glob("*.py"), *ROOT.glob("benchmarks/*.py")]:  # copies: the project's files stay untouched
        shutil.copy2(path, tmp_path / path.relative_to(ROOT))
    monkeypatch.setattr(tasks, "HERE", tmp_path)
    monkeypatch.setattr(tasks, "FLAGS_CACHE", tmp_path / "flags.json")
    monkeypatch.setattr(sys, "path", list(sys.path))  # script_parsers puts the scripts' folders on it

    def tamper():  # the cache with its key, but a flag only it names: seen only where the cache is read
        record = json.loads(tasks.FLAGS_CACHE.read_text())
        record["flags"]["pretrain"][0]["option_strings"] = ["--cached"]
        tasks.FLAGS_CACHE.write_text(json.dumps(record))
    fresh = tasks.script_flags()
    tamper()
    assert tasks.script_flags()["pretrain"][0].option_strings == ["--cached"]  # the scripts as they were: the cache
    script, before = tmp_path / "pretrain.py", (tmp_path / "pretrain.py").stat()
    os.utime(script, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))  # its mtime changed
    assert tasks.script_flags() == fresh
    tamper()
    with open(script, "a") as f:
        f.write("\n")
    os.utime(script, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))  # its size changed, its mtime as cached
    assert tasks.script_flags() == fresh


@pytest.mark.parametrize("fault", ["full disk", "folder in the way"])
def test_the_flags_cache_failing_to_write_leaves_no_temporary_file(tmp_path, small_filesystem, monkeypatch, fault):
    """Before: each invoke on a full disk, or with a folder named as the cache, left a temporary file beside it."""
    import tasks
    folder = small_filesystem("12k") if fault == "full disk" else tmp_path / "pycache"
    monkeypatch.setattr(tasks, "FLAGS_CACHE", folder / "tasks-flags.json")
    if fault == "folder in the way":
        tasks.FLAGS_CACHE.mkdir(parents=True)
    assert "--lr-schedule" in [flag for action in tasks.script_flags()["pretrain"] for flag in action.option_strings]
    assert [p.name for p in folder.iterdir()] == (["tasks-flags.json"] if fault != "full disk" else [])
    if fault == "folder in the way":  # once out of the way: written with the umask's permissions (before: 0600)
        tasks.FLAGS_CACHE.rmdir()
        previous = os.umask(0o022)
        try:
            tasks.script_flags()
        finally:
            os.umask(previous)
        assert [p.name for p in folder.iterdir()] == ["tasks-flags.json"]
        assert tasks.FLAGS_CACHE.stat().st_mode & 0o777 == 0o644
