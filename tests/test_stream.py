"""The memory-mapped cache and the one batch path: streamed batches are the resident ones, the cache is never
trusted past what was written, and decoding processes end with the run that started them."""
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cli
import data
from conftest import QUICK, ROOT, default_signals, error_line, make_class_folders, run, start, stop_during


def test_streamed_batches_are_the_resident_ones_and_subsets_are_rows_not_copies(tmp_path):
    images = data.load_folder(make_class_folders(tmp_path / "d", train=20, test=1) / "train")
    subset = images.subset(torch.arange(60).flip(0)).subset(torch.arange(0, 60, 2))  # rows 59, 57, ... 1
    assert subset.images.data_ptr() == images.images.data_ptr()  # the same mapping, no copy
    order = torch.randperm(30, generator=torch.Generator().manual_seed(0))
    resident, streamed = subset.to(torch.device("cpu")), subset.streamed(torch.device("cpu"))
    for share in (slice(None), slice(1, None, 2)):
        got = list(streamed.batches(order, 2, 8, share))
        want = list(resident.batches(order, 2, 8, share))
        assert len(got) == len(want) == 2  # steps 2 and 3 of 4
        for (a, y), (b, z) in zip(got, want):
            assert torch.equal(a, b) and torch.equal(y, z)
    rows = torch.arange(59, 0, -2)[order[16:24]]
    assert torch.equal(next(streamed.batches(order, 2, 8))[0], images.images[rows])


def test_a_streamed_batch_stopped_early_ends_its_reading_thread(tmp_path):
    images = data.load_folder(make_class_folders(tmp_path / "d", train=20, test=1) / "train")
    batches = images.streamed(torch.device("cpu")).batches(None, 0, 4)
    next(batches)
    batches.close()
    assert not any(thread.name.startswith("batch-prefetch") for thread in __import__("threading").enumerate())


def test_auto_streams_a_set_larger_than_half_the_free_memory(tmp_path, monkeypatch):
    images = data.load_folder(make_class_folders(tmp_path / "d", train=4, test=1) / "train")  # 12 x 3 KB
    cpu = torch.device("cpu")
    monkeypatch.setattr(cli, "free_memory", lambda device: 2 * images.nbytes)
    placed = data.place(images, cpu, "auto")
    assert placed.device is None and placed.images.data_ptr() != images.images.data_ptr()  # a resident copy
    monkeypatch.setattr(cli, "free_memory", lambda device: 2 * images.nbytes - 1)
    assert data.place(images, cpu, "auto").device == cpu  # streamed from the mapping
    assert data.place(images, cpu, "never").device is None and data.place(images, cpu, "always").device == cpu
    assert cli.free_memory(cpu) > 0


def test_a_relative_data_folder_is_cached_too(tmp_path, monkeypatch):
    make_class_folders(tmp_path / "d", train=3, test=1)
    monkeypatch.chdir(tmp_path)
    data.load_folder(Path("d") / "train")
    assert sorted(p.name for p in (tmp_path / "d" / ".cache").iterdir()) == ["train.json", "train.u8"]
    os.umask(mask := os.umask(0))
    assert (tmp_path / "d" / ".cache" / "train.u8").stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_stop_while_the_cache_file_is_allocated_leaves_no_file(tmp_path, monkeypatch):
    """Before: only an OSError removed it: a Ctrl-C there left the file (gigabytes for a large set) till the next
    build."""
    root = make_class_folders(tmp_path / "d", train=3, test=1)

    def interrupted(fd, size):
        raise KeyboardInterrupt
    monkeypatch.setattr(data, "allocate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data.load_folder(root / "train")
    assert list((root / ".cache").iterdir()) == []


def test_files_get_the_umasks_permissions_without_the_umask_being_set(tmp_path, monkeypatch):
    """Before: each cache and atomic write read the umask by setting it to 0 and back, so a thread creating a file
    meanwhile (the checkpoint writer beside the main thread) made it 0666, or left the umask 0 for good."""
    make_class_folders(tmp_path / "d", train=3, test=1)
    previous = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda mask: pytest.fail("the process's umask was set"))
        data.load_folder(tmp_path / "d" / "train")
        cli.write_atomically(tmp_path / "f.bin", lambda f: f.write(b"x"))
    finally:
        monkeypatch.undo()
        os.umask(previous)
    for path in (tmp_path / "d" / ".cache" / "train.u8", tmp_path / "f.bin"):
        assert path.stat().st_mode & 0o777 == 0o640
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_truncated_or_lengthened_cache_file_is_rebuilt_never_mapped_past_its_end(tmp_path):
    root = make_class_folders(tmp_path / "d", train=3, test=1)
    first = data.load_folder(root / "train")
    cache = root / ".cache" / "train.u8"
    size = cache.stat().st_size
    assert size == 9 * 3 * 32 * 32
    for length in (size - 1, 0, size + 1):
        os.truncate(cache, length)
        again = data.load_folder(root / "train")
        assert torch.equal(again.images, first.images) and cache.stat().st_size == size
    with open(cache, "r+b") as changed:  # changed underneath at its length: the metadata's checksum tells
        changed.seek(size // 2)
        byte = changed.read(1)
        changed.seek(size // 2)
        changed.write(bytes([byte[0] ^ 0xFF]))
    assert torch.equal(data.load_folder(root / "train").images, first.images)


def test_a_build_leaves_no_trusted_cache_until_complete_and_a_killed_builds_file_is_removed(tmp_path, monkeypatch):
    root = make_class_folders(tmp_path / "d", train=3, test=1)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = root / ".cache" / f".train.u8.{dead.stdout.strip()}-abc.tmp"  # a killed build's
    stale.parent.mkdir()
    stale.write_bytes(b"x" * 100)
    calls = []

    def decode(path, size):
        calls.append(path)
        if len(calls) == 5:
            assert list(stale.parent.iterdir()) != [stale.parent / "train.json"]
            raise cli.DataError(f"{path}: cannot read")
        return np.zeros((size, size, 3), np.uint8), 32

    monkeypatch.setattr(data, "decode", decode)
    with pytest.raises(cli.DataError):
        data.load_folder(root / "train", size=32)
    assert list(stale.parent.iterdir()) == []  # neither the stale file, nor this build's, nor any metadata


def test_stored_size_is_the_cache_side_and_reaches_the_checkpoint(tiny_data, tmp_path):
    images = data.load_dataset(tiny_data, stored_size=24)
    assert images[0].images.shape[-1] == images[1].images.shape[-1] == 24
    result = run("pretrain.py", "--data-dir", tiny_data, "--out", tmp_path / "p.pt", "--stored-size", "7",
                 "--epochs", "1", *QUICK, check=False)
    assert "--stored-size: must be at least" in error_line(result)
    result = run("pretrain.py", "--data-dir", tiny_data, "--out", tmp_path / "p.pt", "--stored-size", "1025",
                 "--epochs", "1", *QUICK, check=False)
    assert "--stored-size: must be at least 8 and at most 1024 px, got 1025" in error_line(result)


def test_limit_keeps_every_class_or_names_limit(tmp_path):
    root = tmp_path / "d"
    for split, counts in (("train", {"a": 200, "z": 3, "c": 200}), ("test", {"a": 1, "z": 1, "c": 1})):
        for name, count in counts.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (8, 8), "white").save(root / split / name / f"{i}.png")
    result = run("pretrain.py", "--data-dir", root, "--out", tmp_path / "p.pt", "--limit", "20", "--epochs", "1",
                 *QUICK, check=False)
    line = error_line(result)
    assert line.startswith("pretrain.py: --limit 20: a stratified sample this small leaves class z (3 images)")
    advised = int(line.split("pass --limit ")[1].split()[0])
    labels = torch.tensor([0] * 200 + [1] * 200 + [2] * 3)
    picked = data.stratified_split(labels, advised, 0)[0]
    assert torch.bincount(labels[picked]).tolist()[2] == 2
    assert (torch.bincount(labels[data.stratified_split(labels, advised - 1, 0)[0]], minlength=3) < 2).any()


@pytest.fixture(scope="module")
def resident(tiny_data, tmp_path_factory) -> Path:
    """A two-epoch run with its images on the device whole: what a streamed run must end as."""
    out = tmp_path_factory.mktemp("resident") / "pretrain.pt"
    run("pretrain.py", *start(out, 2, tiny_data), "--stream", "never")
    yield out
    shutil.rmtree(out.parent)  # its checkpoints go with the module, not at the session's end


@pytest.mark.slow
def test_streamed_and_resident_training_end_with_bit_identical_weights(resident, tiny_data, tmp_path):
    outs = {"never": resident, "always": tmp_path / "always" / "pretrain.pt"}
    run("pretrain.py", *start(outs["always"], 2, tiny_data), "--stream", "always")
    for suffix in (".pt", ".last.pt"):
        a = torch.load(outs["never"].with_suffix(suffix), weights_only=True)["model"]
        b = torch.load(outs["always"].with_suffix(suffix), weights_only=True)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), suffix
    reports = [json.loads(out.with_suffix(".test.json").read_text()) for out in outs.values()]
    assert reports[0].pop("checkpoint") != reports[1].pop("checkpoint") and reports[0] == reports[1]


@pytest.mark.slow
def test_a_streamed_run_stopped_and_resumed_ends_as_a_resident_one(resident, tiny_data, tmp_path):
    whole = resident
    parts = tmp_path / "parts" / "pretrain.pt"
    stop_during("epoch 1/2", signal.SIGTERM, [*start(parts, 2, tiny_data), "--stream", "always"])
    run("pretrain.py", "--resume", parts.with_suffix(".last.pt"), "--stream", "always")
    a = torch.load(whole.with_suffix(".last.pt"), weights_only=True)["model"]
    b = torch.load(parts.with_suffix(".last.pt"), weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, IndexError):
            continue
    return found


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def descendants(pid: int) -> list[int]:
    """Children, theirs, and so on: under forkserver the decoding processes are the server's children."""
    found = children(pid)
    return found + [grandchild for child in found for grandchild in descendants(child)]


# A script run under a given start method of multiprocessing (Python 3.14 on Linux takes forkserver by default,
# macOS and Windows spawn): python -c WITH_START_METHOD METHOD SCRIPT ARGS...
WITH_START_METHOD = ("import multiprocessing, runpy, sys; multiprocessing.set_start_method(sys.argv[1]); "
                     "sys.argv = sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_the_decoding_processes_work_under_every_start_method(tmp_path, method):
    root = make_class_folders(tmp_path / "d", train=150, test=1, size=8)  # 450 images: two decoding tasks
    script = tmp_path / "cache.py"
    script.write_text("import sys; sys.path.insert(0, sys.argv[1]); import data, numpy\n"
                      "if __name__ == '__main__':\n"
                      "    images = data.load_folder(sys.argv[2]).images.numpy()\n"
                      "    print(images.shape, int(images.astype(numpy.int64).sum()))\n")
    result = subprocess.run([sys.executable, "-c", WITH_START_METHOD, method, str(script), str(ROOT),
                             str(root / "train")], capture_output=True, text=True)
    want = data.decode_all(sorted(root.glob("train/*/*.png")), None, None)[0]
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [*str(want.shape).split(), str(int(want.astype(np.int64).sum()))]


@pytest.mark.slow
def test_a_split_decodes_in_a_daemonic_process(tmp_path):
    """A multiprocessing.Pool's worker may start no process: it decodes in its own (before: an AssertionError,
    "daemonic processes are not allowed to have children", for a split of more than 256 images)."""
    root = make_class_folders(tmp_path / "d", train=150, test=1, size=8)  # 450 images: two decoding tasks
    script = tmp_path / "pool.py"
    script.write_text("import multiprocessing, sys; sys.path.insert(0, sys.argv[1]); import data\n"
                      "def count(folder):\n"
                      "    data.WORKERS = 2  # decoding processes, as on any machine of two cores or more\n"
                      "    return len(data.load_folder(folder, cache=False))\n"
                      "if __name__ == '__main__':\n"
                      "    with multiprocessing.Pool(1) as pool:\n"
                      "        print(pool.apply(count, (sys.argv[2],)))\n")
    result = subprocess.run([sys.executable, str(script), str(ROOT), str(root / "train")], capture_output=True,
                            text=True)
    assert result.returncode == 0 and result.stdout == "450\n", result.stderr


def stop_handlers() -> list:
    """In a decoding worker: its handlers of SIGINT, SIGTERM and SIGHUP."""
    return [signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)]


def handlers_of_a_worker(path, shape, start, paths) -> list:
    """In place of data.decode_rows: a decoding worker's handlers of SIGINT, SIGTERM and SIGHUP."""
    return [stop_handlers()]


@pytest.mark.skipif(not hasattr(signal, "SIGHUP") or multiprocessing.get_start_method() != "fork",
                    reason="POSIX signals; a forked worker (a patch reaches it)")
def test_a_forked_decoding_worker_gets_the_default_stop_actions_back(tmp_path, monkeypatch):
    """A forked worker copies its parent's handlers: cli.run_script's (a KeyboardInterrupt at SIGTERM or SIGHUP), and
    cli.stops_held's while the pool starts (before: those were kept, and the workers ignored SIGTERM and SIGHUP).
    die_with_parent puts the default actions back, so a process group's SIGTERM or the pool's terminate() ends them;
    Ctrl-C is the parent's. The killed runs of test_a_run_killed_while_decoding_leaves_no_process_and_no_lock end
    alike without."""
    monkeypatch.setattr(data, "decode_rows", handlers_of_a_worker)
    monkeypatch.setattr(data, "WORKERS", 2)
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        for sig in saved:
            signal.signal(sig, cli.interrupt)  # as cli.run_script has them in a script's process
        handlers = data.decode_into(tmp_path / "images.u8", [tmp_path] * (2 * data.DECODE_CHUNK), (1, 3, 1, 1))
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert handlers == [[signal.SIG_IGN, signal.SIG_DFL, signal.SIG_DFL]] * 2


@pytest.mark.skipif(not hasattr(signal, "SIGHUP") or multiprocessing.get_start_method() != "fork",
                    reason="POSIX signals; a forked worker (a patch reaches it)")
def test_a_stop_signal_as_the_decoding_pool_starts_reaches_the_handler_once_its_tasks_are_handed_over(
        tmp_path, monkeypatch):
    """A stop signal while the pool forks its processes and takes its tasks is held (cli.stops_held) until map has
    handed over every task, then handled: raised in the pool's start, it left processes that no thread would end (the
    exit waited for them forever). The signal is sent from inside map, so that it certainly comes then."""
    monkeypatch.setattr(data, "decode_rows", handlers_of_a_worker)
    monkeypatch.setattr(data, "WORKERS", 2)
    mapping, received = [False], []
    real_map = ProcessPoolExecutor.map

    def map_signalled(self, *args, **kwargs):
        mapping[0] = True
        try:
            signal.raise_signal(signal.SIGTERM)  # as its first process forks
            return real_map(self, *args, **kwargs)
        finally:
            mapping[0] = False

    monkeypatch.setattr(ProcessPoolExecutor, "map", map_signalled)
    saved = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, lambda signum, frame: received.append("in map" if mapping[0] else "after"))
        handlers = data.decode_into(tmp_path / "images.u8", [tmp_path] * (2 * data.DECODE_CHUNK), (1, 3, 1, 1))
    finally:
        signal.signal(signal.SIGTERM, saved)
    assert received == ["after"] and len(handlers) == 2


@pytest.mark.slow
@pytest.mark.parametrize("method, sig, group", [("fork", signal.SIGKILL, False), ("fork", signal.SIGTERM, False),
                                                ("fork", signal.SIGTERM, True), ("forkserver", signal.SIGKILL, False),
                                                ("spawn", signal.SIGKILL, False)])
def test_a_run_killed_while_decoding_leaves_no_process_and_no_lock(tmp_path, method, sig, group):
    """`group`: SIGTERM to the whole process group (`kill -- -PGID`, a service stopped): forked workers had the
    script's handler (a KeyboardInterrupt), and the run could hang in the pool's shutdown."""
    root = tmp_path / "d"
    picture = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)).save(picture)
    for split, count in (("train", 1500), ("test", 1)):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                os.link(picture, root / split / name / f"{i}.png")
    out = tmp_path / "p.pt"
    shared = Path(os.environ["TMPDIR"])  # the session's temporary folder, which the run is not to be given
    before = set(shared.iterdir())
    process = subprocess.Popen([sys.executable, "-c", WITH_START_METHOD, method, str(ROOT / "pretrain.py"),
                                "--data-dir", str(root), "--out", str(out), *QUICK],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=group, preexec_fn=default_signals,
                               env=os.environ | {"TMPDIR": str(tmp_path)})
    # TMPDIR: a process killed by SIGKILL cannot remove its temporary files (the forkserver's pymp-* folder)
    workers = []
    for _ in range(600):
        workers = descendants(process.pid)
        if len(workers) >= min(2, data.WORKERS) or process.poll() is not None:
            break
        time.sleep(0.05)
    assert workers and process.poll() is None, "no decoding process seen"
    time.sleep(0.5)  # decoding under way
    os.killpg(process.pid, sig) if group else process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    if sig == signal.SIGTERM:  # stopped as by Ctrl-C: one line
        assert process.returncode == 128 + sig and stderr.splitlines()[-1] == (
            "pretrain.py: interrupted; nothing more was saved") and "Traceback" not in stderr, stderr
    for _ in range(600):  # a process still importing torch (spawn, forkserver) looks at its parent only after that
        if not any(alive(pid) for pid in workers):
            break
        time.sleep(0.1)
    assert not any(alive(pid) for pid in workers)
    import pretrain
    with pretrain.out_lock(out):  # the next run is not refused
        pass
    assert not (root / ".cache" / "train.json").exists()
    # what a killed run leaves in its TMPDIR (the forkserver's pymp-* folder) is in the test's folder, which goes
    assert set(shared.iterdir()) - before == set()


def test_predict_prints_each_batch_before_decoding_the_next(pretrained, tiny_data, monkeypatch):
    """Streamed: --batch-size images decoded, predicted and printed at a time, so memory stays bounded."""
    decode, printed = data.decode, []

    def counting_decode(path, size):
        printed.append(sys.stdout.getvalue().count("\t") // 2)  # result lines so far (run() captures stdout)
        return decode(path, size)

    monkeypatch.setattr(data, "decode", counting_decode)
    result = run("predict.py", tiny_data / "test", "--checkpoint", pretrained, "--device", "cpu", "--batch-size", "4")
    assert len(printed) == 18 and "18 labelled images: accuracy" in result.stdout
    assert printed == [4 * (i // 4) for i in range(18)]


def test_the_transforms_constants_are_made_once_per_cuda_device_and_never_kept_from_a_trace(monkeypatch):
    """torch.tensor(values, device=cuda) is a blocking copy, the host waiting for all the GPU has queued: made for
    each batch (the mean, the std, the evaluation's crop box), each training step waited twice. (CUDA stood in for.)"""
    made = []
    monkeypatch.setattr(torch, "tensor", lambda values, dtype, device: made.append(device) or object())
    data.device_constants.cache_clear()
    try:
        cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
        first = data.constants(data.MEAN, cuda)
        assert data.constants(data.MEAN, cuda) is first and made == [cuda]
        data.constants(data.MEAN, cpu)
        data.constants(data.MEAN, torch.device("cuda", 1))
        assert made == [cuda, cpu, torch.device("cuda", 1)]
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # torch.export's tracing: its own tensor
        assert data.constants(data.MEAN, cuda) is not first and made[-1] == cuda and len(made) == 4
    finally:
        data.device_constants.cache_clear()


class IndexDevices(torch.overrides.TorchFunctionMode):
    """Records (indexed tensor's device, index's device) for every tensor indexed with a tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[torch.device, torch.device]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__getitem__ and isinstance(args[1], torch.Tensor):
            self.seen.append((args[0].device, args[1].device))
        return func(*args, **(kwargs or {}))


def test_batches_in_turn_index_images_on_a_device_with_positions_there_too():
    """Evaluation's batches (no order: in turn) indexed images resident on CUDA with CPU positions: each batch's index
    copied to the GPU by a blocking copy, the host waiting for all queued there, twice a batch (images and labels).
    (The meta device stands in for CUDA.)"""
    meta = torch.device("meta")
    images = data.ImageSet(torch.empty(5, 3, 8, 8, dtype=torch.uint8, device=meta),
                           torch.empty(5, dtype=torch.int64, device=meta), ["a", "b"])
    with IndexDevices() as indexing:
        got = [len(x) for x, _ in images.batches(None, 0, 2)]
    assert got == [2, 2, 1] and len(indexing.seen) == 6
    assert all(indexed == index for indexed, index in indexing.seen), indexing.seen
