"""benchmarks/headline.py: the rehearsal of the GPU run end to end, the time limit, a step cut off by a real SIGINT."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, default_signals

sys.path.insert(0, str(ROOT / "benchmarks"))
import headline  # noqa: E402

EVERY_STEP = ["download", headline.THROUGHPUT_RUNS[0][0], "pretrain", "finetune", "predict", "cuda-tests",
              *(name for name, _ in headline.THROUGHPUT_RUNS[1:]), "latency",
              *(f"recipe {name}" for name in headline.REHEARSAL.recipes)]


def table(results: str) -> dict[str, list[str]]:
    """results.md's rows by step: wall time, figures, command."""
    rows = [line.strip("| ").split(" | ") for line in results.splitlines() if line.startswith("| ")]
    return {row[0]: row[1:] for row in rows[2:]}


def script_output(log: Path) -> list[str]:
    """The lines a step's script wrote, from its log (headline.py frames them with its command and exit status)."""
    return log.read_text().split("\n", 1)[1].rsplit("\n# exit ", 1)[0].splitlines()


@pytest.mark.slow
def test_the_rehearsal_runs_every_step_and_tables_every_figure(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "headline.py"), "--rehearse",
                             "--out-dir", out, "--work-dir", work], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    results = (out / "results.md").read_text()
    assert "- device: CPU" in results and "commit" in results and "--rehearse" in results
    rows = table(results)
    assert list(rows) == EVERY_STEP and all(row[0].endswith(" s") for row in rows.values())  # each ran, exit 0
    assert "tests/test_cuda.py: 7 skipped" in rows["cuda-tests"][1]
    for name, flags in headline.THROUGHPUT_RUNS:
        streamed = "--stream" in flags  # a second table: streamed against resident
        assert "training images/s, ours / reference: " in rows[name][1] and rows[name][1].count("x") == 2 + 2 * streamed
        assert ("training images/s, streamed / resident: " in rows[name][1]) == streamed
    report = json.loads((work / headline.RUN_FOLDER / "checkpoints" / "finetune.test.json").read_text())
    assert f"test accuracy, once, best validation epoch: {report['accuracy']:.2%}" in rows["finetune"][1]
    assert rows["pretrain"][2].startswith("`python pretrain.py --data-dir ")
    assert "cpu exported: batch 1 median / p95 ms, batch images/s: " in rows["latency"][1]
    logs = ["cuda-tests.log", "job.log", "latency.log", "recipes.log",
            *(f"{name}.log" for name, _ in headline.THROUGHPUT_RUNS)]
    assert sorted(p.name for p in out.iterdir()) == sorted([*logs, "results.md"])  # a GPU lease returns 8 files
    assert (out / "job.log").read_text().count("# exit 0, ") == 4  # download, pretrain, finetune, predict
    # The scripts' own output, which their logs keep: the rehearsal runs each as a test of it would (a process each).
    lines = script_output(out / "throughput-stream.log")
    assert lines[0].startswith("device: CPU") and "commit" in lines[1] and "throughput.py" in lines[2]
    assert "batch size 8, image size 64" in lines[3] and "decoding 120 training images" in lines[4]
    for name in ("train", "evaluate"):
        rows = [line.split() for line in lines if line.startswith(name)]
        assert len(rows) == 2  # ours against the reference, then streamed against resident
        assert all(float(row[1]) > 0 and float(row[2]) > 0 and row[3].endswith("x") for row in rows)
    assert lines[-3].split() == ["streamed", "resident", "ratio"]
    lines = script_output(out / "latency.log")
    assert lines[0].startswith("device: CPU") and "commit" in lines[1] and "latency.py" in lines[2]
    assert lines[4] == "| device | model | batch 1 median ms | batch 1 p95 ms | batch 4 images/s |"
    rows = [line.strip("| ").split(" | ") for line in lines[6:]]
    assert [row[:2] for row in rows] == [["cpu", "eager"], ["cpu", "exported"]]
    assert all(0 < float(row[2]) <= float(row[3]) and float(row[4]) > 0 for row in rows)


def test_no_step_starts_that_the_time_left_cannot_fit(tmp_path):
    work = tmp_path / "work"
    steps = headline.plan(headline.parse_args(["--rehearse", "--work-dir", str(work)]), headline.REHEARSAL, work)
    failed = headline.run_all(steps, headline.REHEARSAL, tmp_path, "header", time.monotonic() + 6.4)  # 6 s left
    rows = table((tmp_path / "results.md").read_text())
    assert failed == 0 and list(rows) == EVERY_STEP
    assert rows["cuda-tests"][:2] == ["not run", "needs about 20 s, 6 s were left"]
    assert rows["pretrain"][:2] == ["not run", "download did not succeed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.md"]


def test_the_whole_job_fits_in_the_first_eight_minutes_at_the_target_speed(tmp_path):
    """A lent GPU runs `--minutes 8` once: at 30,000 images/s (the target) the download, a throughput run and the 40 +
    40 job fit (before: the CUDA tests and three throughput runs came first, 600 s of estimates: the job not run)."""
    steps = headline.plan(headline.parse_args(["--work-dir", str(tmp_path)]), headline.GPU, tmp_path)
    job = steps[:[step.name for step in steps].index("predict") + 1]
    assert {"pretrain", "finetune"} <= {step.name for step in job}
    assert sum(headline.estimate(step, 30_000) for step in job) <= 8 * 60


def test_minutes_too_short_for_any_step_is_one_line_and_a_failure(tmp_path, capsys):
    """Before: `--minutes 0.1` ran nothing, tabled every step as not run, and exited 0."""
    with pytest.raises(SystemExit) as exit:
        headline.main(["--rehearse", "--out-dir", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"),
                       "--minutes", "0.1"])
    assert exit.value.code == ("headline.py: --minutes 0.1: too short for any step (the shortest, download, needs "
                               "about 10 s); pass --minutes 0.2 or more")
    assert not (tmp_path / "out" / "results.md").exists()


def test_a_second_run_in_one_work_folder_starts_without_the_previous_runs_checkpoints(tmp_path, capsys):
    """Before: pretrain refused ("exists already"), finetune and predict were not run, yet the pretrain row showed the
    previous run's accuracies."""
    work = tmp_path / "work"
    steps = {step.name: step for step in headline.plan(headline.parse_args(["--rehearse", "--work-dir", str(work)]),
                                                       headline.REHEARSAL, work)}
    for name in ("pretrain", "finetune", "recipe " + headline.REHEARSAL.recipes[0]):
        steps[name].report.parent.mkdir(parents=True, exist_ok=True)
        steps[name].report.write_text("{}")  # the previous run's
    with pytest.raises(SystemExit):
        headline.main(["--rehearse", "--out-dir", str(tmp_path / "out"), "--work-dir", str(work), "--minutes", "0.001"])
    assert not (work / headline.RUN_FOLDER).exists() and (work / "generated").is_dir()


def test_a_step_still_running_when_the_time_is_up_gets_sigint_and_keeps_its_log(tmp_path):
    # a step that saves its state on Ctrl-C sets its own handler, as pretrain.py does: a suite started in the
    # background (`nohup python -m pytest &`) hands SIGINT down ignored
    code = "import signal, sys, time\nsignal.signal(signal.SIGINT, signal.default_int_handler)\ntry:\n" \
           "    print('started', flush=True); time.sleep(60)\nexcept KeyboardInterrupt:\n" \
           "    print('saved my state'); sys.exit(130)"
    step = headline.Step("sleeper", "sleeper", [sys.executable, "-c", code], 1)
    started = time.monotonic()
    status, seconds, output, stopped = headline.run_step(step, tmp_path, seconds_left=3)
    assert status == 130 and stopped is None and seconds < 30 and time.monotonic() - started < 30
    assert output.splitlines()[:2] == ["started", "saved my state"]
    assert (tmp_path / "sleeper.log").read_text().endswith(f"# exit 130, {seconds:.1f} s\n\n")


def test_without_cuda_the_gpu_run_says_to_rehearse(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit:
        headline.main(["--out-dir", str(tmp_path / "out")])
    assert "CUDA is not available on this machine" in exit.value.code and "pass --rehearse" in exit.value.code
    assert not (tmp_path / "out").exists()


def test_a_streamed_throughput_run_is_tabled_as_streamed_against_resident():
    """--stream always prints a second table; its rows must not read as ours against the reference."""
    output = ("           ours  reference   ratio   (ours trained in bf16)\n"
              "train        900        30    30.0x   images/s\nevaluate    2000       100    20.0x   images/s\n"
              "             streamed   resident   ratio\n"
              "train        880        900     0.98x   images/s\nevaluate    1900       2000     0.95x   images/s\n")
    step = headline.Step("throughput-stream", "throughput-stream", ["throughput.py"], 1.0)
    assert headline.figures(step, output) == [
        ("training images/s, ours / reference", "900 / 30 = 30.0x"),
        ("evaluation images/s, ours / reference", "2000 / 100 = 20.0x"),
        ("training images/s, streamed / resident", "880 / 900 = 0.98x"),
        ("evaluation images/s, streamed / resident", "1900 / 2000 = 0.95x")]


def test_latency_rows_are_tabled_by_device_and_model():
    output = ("| device | model | batch 1 median ms | batch 1 p95 ms | batch 64 images/s |\n"
              "| --- | --- | --- | --- | --- |\n| cpu | eager | 12.50 | 14.00 | 300 |\n"
              "| cuda | exported | 0.90 | 1.10 | 25000 |\n")
    step = headline.Step("latency", "latency", ["latency.py"], 1.0)
    assert headline.figures(step, output) == [
        ("cpu eager: batch 1 median / p95 ms, batch images/s", "12.50 / 14.00, 300"),
        ("cuda exported: batch 1 median / p95 ms, batch images/s", "0.90 / 1.10, 25000")]


@pytest.mark.parametrize("flag", ["--out-dir", "--work-dir"])
def test_a_folder_flag_naming_a_file_is_one_line(tmp_path, flag, capsys):
    (tmp_path / "file").write_text("in the way")
    folders = {"--out-dir": tmp_path / "out", "--work-dir": tmp_path / "work"}
    folders[flag] = tmp_path / "file" / "sub"
    argv = ["--rehearse", "--minutes", "0.001"] + [str(a) for pair in folders.items() for a in pair]
    with pytest.raises(SystemExit) as stop:
        headline.main(argv)
    assert f"{flag} {folders[flag]}: cannot make this folder or write in it" in str(stop.value.code)
    assert (tmp_path / "file").read_text() == "in the way" and not (tmp_path / "out" / "results.md").exists()


@pytest.mark.parametrize("flag", ["--out-dir", "--work-dir"])
def test_a_read_only_folder_flag_is_one_line(tmp_path, small_filesystem, flag):
    """Before: a traceback when the first step's log, or the generated data, was written."""
    folders = {"--out-dir": tmp_path / "out", "--work-dir": tmp_path / "work"}
    folders[flag] = small_filesystem(read_only=True)
    argv = ["--rehearse", "--minutes", "0.001"] + [str(a) for pair in folders.items() for a in pair]
    with pytest.raises(SystemExit) as stop:
        headline.main(argv)
    assert str(stop.value.code) == (f"headline.py: {flag} {folders[flag]}: cannot make this folder or write in it "
                                    f"(Read-only file system); choose another {flag}")


@pytest.mark.slow  # a real headline.py process, real signals
@pytest.mark.parametrize("signals", [[signal.SIGTERM], [signal.SIGINT, signal.SIGINT], [signal.SIGHUP]],
                         ids=["sigterm", "ctrl-c-twice", "sighup"])
def test_a_stop_signal_stops_the_step_under_way_which_gets_a_row_and_no_traceback(tmp_path, signals):
    """Before: the interrupted step had no row, its log a KeyboardInterrupt traceback, and headline.py exited 1; a
    second Ctrl-C while the step was stopping lost its row too, and SIGHUP left the step running, orphaned."""
    step = ("import os, signal, time\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "print('measured 42 images/s', flush=True)\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n"
            "    time.sleep(1)  # saving its state, then killed by SIGINT, as the scripts end (cli.run_script)\n"
            "    signal.signal(signal.SIGINT, signal.SIG_DFL); os.kill(os.getpid(), signal.SIGINT)\nprint('never')")
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import headline\n"
            f"headline.plan = lambda *_: [headline.Step('sleeper', 'sleeper', [sys.executable, '-c', {step!r}], 1), "
            "headline.Step('after', 'after', [sys.executable, '-c', 'pass'], 1)]\n"
            f"headline.main(['--rehearse', '--out-dir', {str(tmp_path / 'out')!r}, '--work-dir', "
            f"{str(tmp_path / 'work')!r}])")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=tmp_path, preexec_fn=default_signals)
    try:
        log = tmp_path / "out" / "sleeper.log"
        while not log.exists() or "\nmeasured 42 images/s\n" not in log.read_text():  # its output, not its command
            time.sleep(0.1)
        for sig in signals:
            process.send_signal(sig)
            time.sleep(0.3)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    name = signals[0].name
    assert process.returncode == 128 + signals[0] and stderr.endswith(
        f"headline.py: stopped by {name}; what was measured is in {tmp_path / 'out' / 'results.md'}\n"), stderr
    rows = table((tmp_path / "out" / "results.md").read_text())
    assert list(rows) == ["sleeper"] and rows["sleeper"][0].endswith(f" s, stopped by {name}")
    log = (tmp_path / "out" / "sleeper.log").read_text()
    assert "Traceback" not in stderr + log and "\nnever" not in log and log.endswith(" s\n\n")
    assert f"\n# exit {128 + signals[0]}, " in log  # killed by signal N: 128 + N, as a shell says it (before: -N)
