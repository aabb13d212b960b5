r"""invoke tasks: each runs one of the scripts; `invoke --list`, `invoke --help TASK`.

    invoke all                     # download, pretrain, finetune, predict: the whole job
    invoke all --epochs 3 --limit 4000 --image-size 64 --batch-size 64 --lr 0.03 \
        --source ../shared/data/cifar10-jpg.tar.gz
    invoke pretrain --epochs 3 --ema 0.999 --lr-schedule cosine
    invoke predict --paths cat.png --paths photos/ --topk 3
    invoke predict --topk 3 -- cat.png photos/*.jpg
    invoke export --checkpoint checkpoints/finetune.pt --out model.pt2

A task's flags are its script's, read from the script's own argparse parser (its build_parser): the same names and
help, the defaults argparse's, so a flag added to a script is a flag of its task too. A flag left out is left to the
script; a value is passed as written, for the script to check. Words after `--` are passed after the flags (invoke
joins them with spaces: a name holding one needs --paths). The scripts run in the folder invoke is called from
(`invoke -r PROJECT` from elsewhere reads and writes there); each command is shown on stderr before it runs.
"""
import argparse
import atexit
import contextlib
import functools
import importlib
import inspect
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from invoke import Exit, Task, task

HERE = Path(__file__).resolve().parent
# Each task's script. Their flags are read from FLAGS_CACHE while no .py file changed: the scripts import torch
# (seconds), which `invoke --list` and `invoke --help TASK` do not need.
SCRIPTS = {"download": "download.py", "pretrain": "pretrain.py", "finetune": "finetune.py", "predict": "predict.py",
           "export": "export.py", "bench": "benchmarks/throughput.py", "headline": "benchmarks/headline.py"}
FLAGS_CACHE = HERE / "__pycache__" / "tasks-flags.json"
RESUME_WITH = "ALEXNET_RESUME_WITH"  # pretrain.RESUME_WITH: how a script tasks.py runs says to resume (resume_template)


def script_parsers(names=SCRIPTS) -> dict[str, argparse.ArgumentParser]:
    """The scripts' own parsers (build_parser) by task name, argparse's errors naming the script; imports torch. A
    script's folder goes on the path, as when it runs (a benchmark's is benchmarks/)."""
    parsers = {}
    for name in names:
        script = HERE / SCRIPTS[name]
        if str(script.parent) not in sys.path:
            sys.path.insert(0, str(script.parent))
        parsers[name] = importlib.import_module(script.stem).build_parser()
        parsers[name].prog = script.name
    return parsers


def script_flags() -> dict[str, list[SimpleNamespace]]:
    """Each script's flags as what tasks need of an argparse action (dest, option_strings, nargs, help, choices,
    default): from FLAGS_CACHE if it was made from these .py files, else from script_parsers, then kept there."""
    files = sorted([*HERE.glob("*.py"), *HERE.glob("benchmarks/*.py")])
    key = [[str(p), p.stat().st_mtime_ns, p.stat().st_size] for p in files]
    try:
        cached = json.loads(FLAGS_CACHE.read_text())
        flags = cached["flags"] if cached["key"] == key else None
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or damaged
        flags = None
    if flags is None:
        fields = ("dest", "option_strings", "nargs", "help", "default", "choices")
        flags = {name: [{field: getattr(action, field) for field in fields} for action in parser.flags]
                 for name, parser in script_parsers().items()}
        flags = json.loads(json.dumps(flags, default=str))  # as read back from the cache
        import cli  # here, as the scripts were: it imports torch
        with contextlib.suppress(OSError):  # a read-only project, a full disk: read from the scripts each time
            cli.write_atomically(FLAGS_CACHE, lambda f: f.write(json.dumps({"key": key, "flags": flags}).encode()))
    return {name: [SimpleNamespace(**action) for action in actions] for name, actions in flags.items()}


def default_of(actions: list[SimpleNamespace], dest: str):
    return next(action.default for action in actions if action.dest == dest)


def is_switch(action: argparse.Action) -> bool:
    return action.nargs == 0


def is_list(action: argparse.Action) -> bool:
    return not action.option_strings and action.nargs in ("+", "*")


def help_of(action: argparse.Action) -> str:
    """The script's help of a flag, with its choices and its default (argparse's: the only list of defaults)."""
    text = (action.help or "").replace("%%", "%")  # argparse's escape
    if action.choices:
        text += f" (one of {', '.join(map(str, action.choices))})"
    if action.default is not None and not is_switch(action):
        text += f" (default {action.default})"
    if is_list(action):
        text += "; repeat the flag for more"
    return text


def script_argv(actions: list[argparse.Action], options: dict, extra: list[str]) -> list[str]:
    """The command line that gives the script `options` (a task's values by dest; those not given are left out),
    with the words in `extra` after its flags."""
    argv, positional = [], []
    for action in actions:
        value = options.get(action.dest)
        if value is None or value is False or value == []:
            continue
        if not action.option_strings:
            positional += value if is_list(action) else [value]
        elif is_switch(action):
            argv.append(action.option_strings[-1])
        else:
            argv += [action.option_strings[-1], str(value)]
    return argv + extra + ["--"] * any(str(p).startswith("-") for p in positional) + [str(p) for p in positional]


def command_line(words: list[str]) -> str:
    """As the shell invoke runs reads it: cmd.exe on Windows (to which single quotes are letters), else sh."""
    return subprocess.list2cmdline(words) if sys.platform == "win32" else shlex.join(words)


def run_shown(c, words: list[str], cwd: Path | None = None) -> None:
    """The command is shown first on stderr, a diagnostic, in invoke's bold only on a terminal; `invoke --dry` shows
    it only. A step that fails ends invoke with the step's exit status (128 + N when signal N stopped it; killed by
    SIGINT, invoke ends so too)."""
    command = command_line(words)
    print(c.config.run.echo_format.format(command=command) if sys.stderr.isatty() else command, file=sys.stderr,
          flush=True)
    if not c.config.run.dry:
        status = run_passing_signals(words, cwd)
        if status == -signal.SIGINT:  # the script ended as Python at a Ctrl-C (cli.run_script): invoke does too
            atexit.register(die_of_sigint)  # as it exits, at the Exit below
        if status:
            raise Exit(code=128 - status if status < 0 else status)  # killed by signal N: -N; as a shell says it


def die_of_sigint() -> None:
    """Invoke's end after a script stopped by Ctrl-C: killed by SIGINT, once its output is out, so that a shell
    running `invoke` in a loop stops too (invoke itself would exit 1 at a KeyboardInterrupt)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed (`| head`): nothing to save
            stream.flush()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)


def run_passing_signals(words: list[str], cwd: Path | None) -> int:
    """Run the command and wait for it, passing it each stop signal invoke receives; its exit status (-N: killed by
    signal N).

    Not c.run: invoke copied the script's output through threads that died with it (the script's last line lost),
    exited at Ctrl-C without waiting, ignored `kill -INT`, and left the script orphaned at SIGTERM (`timeout`); and
    no shell between, which would die at SIGTERM too. The script has invoke's own stdin, stdout and stderr, in a
    session of its own: a signal reaches it once, from invoke (a Ctrl-C at the terminal, which signals invoke's
    group, would otherwise reach it twice: stop at once). On Windows a console's Ctrl-C reaches both: invoke waits.
    """
    posix = sys.platform != "win32"
    import cli  # here: it imports torch, which listing the tasks does not need
    script = SimpleNamespace(pid=None, pending=[])  # taken before the script starts: none is lost while it does
    with cli.handling(functools.partial(pass_signal, script) if posix else signal.SIG_IGN):
        process = subprocess.Popen(words, cwd=cwd, start_new_session=posix)
        script.pid = process.pid
        for signum in script.pending:
            pass_signal(script, signum, None)
        return process.wait()


def pass_signal(script: SimpleNamespace, signum: int, frame) -> None:
    """To the script's whole process group, as a terminal's Ctrl-C would: the script and its workers; one that
    came before the script had a pid goes once it has one."""
    if script.pid is None:
        script.pending.append(signum)
        return
    with contextlib.suppress(ProcessLookupError):  # it has just ended: wait() returns
        os.killpg(script.pid, signum)


def resume_template(name: str) -> str:
    """For pretrain.resume_advice: invoke's own flags as typed, then `all` with the flags typed (--overwrite, which
    --resume refuses, left out) and --resume, or a STAGE task with --resume LAST; a str.format template."""
    typed = ["invoke", *sys.argv[1:]]
    if name == "all":
        words, tail = [word for word in typed if word != "--overwrite"], ""
        words += ["--resume"] * ("--resume" not in words)
    else:
        words, tail = typed[:typed.index(name)] if name in typed else ["invoke"], " {stage} --resume {last}"
    return command_line(words).replace("{", "{{").replace("}", "}}") + tail


def signature(actions: list[argparse.Action], own: dict | None = None) -> inspect.Signature:
    """What invoke reads a task's flags from: (c, `own` flags with their defaults, each action's flag), where an
    action's default is False for a switch and None (left to the script) for a value."""
    defaults = (own or {}) | {action.dest: False if is_switch(action) else None for action in actions}
    return inspect.Signature([inspect.Parameter("c", inspect.Parameter.POSITIONAL_OR_KEYWORD)] + [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default) for name, default in defaults.items()])


def task_of(doc: str, name: str, fallback: dict | None = None) -> Task:
    """A task that runs its script (SCRIPTS) with its flags; `fallback` gives values the script has no default for."""
    script, actions, fallback = SCRIPTS[name], FLAGS[name], fallback or {}

    def body(c, **options):
        os.environ.setdefault(RESUME_WITH, resume_template(name))  # unless `invoke all` set it
        extra = getattr(c, "remainder", "").split()  # the words after `--` (invoke 3 keeps them, joined)
        defaults = {} if extra else {dest: value for dest, value in fallback.items() if not options.get(dest)}
        for dest, value in defaults.items():  # `invoke predict` alone: say what it reads, and that it is a default
            print(f"invoke {name}: no --{dest.replace('_', '-')} given: {' '.join(map(str, value))} (the default)",
                  file=sys.stderr)
        run_shown(c, [sys.executable, str(HERE / script), *script_argv(actions, options | defaults, extra)])

    body.__signature__ = signature(actions)
    body.__doc__ = doc
    helps = {action.dest: help_of(action) for action in actions}
    for dest, value in fallback.items():
        helps[dest] += f" (default {' '.join(value)})"
    # No short flags: they would be drawn from the names in order, and change as scripts gain flags.
    return Task(body, name=name, help=helps, iterable=[a.dest for a in actions if is_list(a)], auto_shortflags=False)


FLAGS = script_flags()
DEFAULT_DATA = default_of(FLAGS["pretrain"], "data_dir")

download = task_of("Download CIFAR-10 (or --source) into train/ and test/ class folders.", "download")
pretrain = task_of("Train AlexNet from scratch.", "pretrain")
finetune = task_of("Fine-tune a trained model (--mode head: its last layer only).", "finetune")
predict = task_of("Classify images and folders of images.", "predict", fallback={"paths": [f"{DEFAULT_DATA}/test"]})
export = task_of("Export a checkpoint as a program that runs without this project, checked against it.", "export")
bench = task_of("Training and evaluation images/s of this pipeline against the reference's.", "bench")
headline = task_of("Every headline figure on a GPU in one command: throughput, the 40 + 40 job, CUDA tests, recipes.",
                   "headline")

STAGES = ("pretrain", "finetune")
# `all` takes both training scripts' flags but these: it names the stages' files itself.
ALL_OWN = ("data_dir", "out", "checkpoint", "resume")
ALL_ACTIONS = list({action.dest: action for stage in reversed(STAGES) for action in FLAGS[stage]
                    if action.dest not in ALL_OWN}.values())


def all_(c, data_dir, out_dir, source=None, md5=None, test_size=None, resume=False, **training):
    """The whole job: download, pretrain, finetune, predict on test images (a grid and the most confident mistakes)."""
    if getattr(c, "remainder", ""):  # each step would pass them on to its script
        raise Exit(f"invoke all: takes no words after --, got {c.remainder!r}; pass flags (invoke --help all)")
    for flag, folder in (("--data-dir", data_dir), ("--out-dir", out_dir)):
        if not folder:  # f"{out_dir}/predictions.png" would be /predictions.png, at the file system's root
            raise Exit(f"invoke all: {flag} is empty; pass a folder (invoke --help all)")
    import predict as predict_script  # here, as script_parsers: they import torch
    import pretrain as pretrain_script
    parsers = script_parsers(TASKS)
    outs = {stage: str(Path(out_dir) / Path(parsers[stage].get_default("out")).name) for stage in STAGES}
    steps = {"download": {"root": data_dir, "source": source, "md5": md5, "test_size": test_size}}
    for stage in STAGES:
        dests = {action.dest for action in parsers[stage].flags}
        state = pretrain_script.side_files(Path(outs[stage]))["last"]
        resumed = resume and state.is_file()  # its --out and --checkpoint are the state's: another name is refused
        steps[stage] = {"data_dir": data_dir, "out": None if resumed else outs[stage],
                        "checkpoint": outs["pretrain"] if stage == "finetune" and not resumed else None,
                        "resume": str(state) if resumed else None,
                        **{name: value for name, value in training.items() if name in dests}}
    steps["predict"] = {"paths": [f"{data_dir}/test"], "checkpoint": outs["finetune"],
                        "grid": f"{out_dir}/predictions.png", "mistakes": f"{out_dir}/mistakes.png",
                        "device": training["device"], "limit": str(predict_script.GRID_MAX)}
    for stage, options in steps.items():  # a typo (`--mode ful`) ends `invoke all` before the download, not after it
        try:
            parsers[stage].parse_args(script_argv(parsers[stage].flags, options, []))
        except SystemExit as e:  # argparse has said what is wrong, as the script would
            raise Exit(code=e.code) from None
    os.environ[RESUME_WITH] = resume_template("all")
    for stage, options in steps.items():
        TASKS[stage](c, **options)


TASKS = {"download": download, "pretrain": pretrain, "finetune": finetune, "predict": predict}
ALL_DEFAULTS = {"data_dir": default_of(FLAGS["download"], "root"),
                "out_dir": str(Path(default_of(FLAGS["pretrain"], "out")).parent),
                "source": None, "md5": None, "test_size": None, "resume": False}
all_.__signature__ = signature(ALL_ACTIONS, ALL_DEFAULTS)
all_ = Task(all_, name="all", auto_shortflags=False, help={
    "data_dir": f"where the data set is downloaded and read (default {ALL_DEFAULTS['data_dir']})",
    "out_dir": f"folder for both stages' checkpoints, logs, reports, pictures, the prediction grid and mistakes "
               f"(default {ALL_DEFAULTS['out_dir']})",
    "resume": "continue each stage from the resume state it left in --out-dir, where there is one",
} | {action.dest: help_of(action) for action in FLAGS["download"] if action.dest in ALL_DEFAULTS}
  | {action.dest: help_of(action) for action in ALL_ACTIONS})


@task
def test(c):
    """Run the test suite."""
    run_shown(c, [sys.executable, "-m", "pytest"], cwd=HERE)
