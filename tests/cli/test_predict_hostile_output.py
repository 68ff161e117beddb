"""`reverse-sd predict --output` never destroys what it writes over (issue 27 item 1), leaves no temporary
file on SIGTERM or Ctrl-C (issue 29 item 6), and caps --batch-size (issue 29 item 3).

Devices are private nodes made with mknod under tmp_path where the test may (root): an old predict that
renamed over its target then replaced a copy, never the machine's /dev/full or /dev/null."""

from __future__ import annotations

import json
import os
import signal
import stat
import threading
import time
from pathlib import Path

import pytest
from conftest import popen_cli, run_cli, use_home, write_tiny_predict_home
from PIL import Image

from cli import main as cli

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(300)]

PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_home(tmp_path_factory) -> Path:
    return write_tiny_predict_home(tmp_path_factory.mktemp("tiny_home"), seed=1)


@pytest.fixture()
def home(tiny_home, monkeypatch) -> Path:
    return use_home(monkeypatch, tiny_home)


@pytest.fixture()
def image(tmp_path) -> Path:
    path = tmp_path / "in" / "red.png"
    path.parent.mkdir()
    Image.new("RGB", (40, 40), "red").save(path)
    return path


def _predict(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["predict", *args, "--model", "vit"])
    out = capsys.readouterr()
    return code, out.out, out.err


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if not line.startswith("note: ")]


def _device(tmp_path: Path, name: str, minor: int) -> Path:
    """A private character device (1, minor) = /dev/null (3) or /dev/full (7); the real one when this user
    cannot make nodes and cannot replace the real one either (not root)."""
    node = tmp_path / name
    try:
        os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
        return node
    except (PermissionError, OSError):
        if os.geteuid() == 0:
            pytest.skip("root without mknod: the test would risk the machine's own device")
        return Path("/dev") / name


# -- issue 27 item 1: what --output writes over -------------------------------------------------------------


def test_a_full_device_gives_one_line_and_stays_a_device(home, image, tmp_path, capsys):
    full = _device(tmp_path, "full", 7)
    code, out, err = _predict(capsys, str(image), "--output", str(full))
    assert code == 2 and out == ""
    assert _errors(err) == [f"error: cannot write --output {full}: No space left on device"]
    assert stat.S_ISCHR(os.lstat(full).st_mode)


def test_a_null_device_is_written_in_place(home, image, tmp_path, capsys):
    null = _device(tmp_path, "null", 3)
    code, out, err = _predict(capsys, str(image), "--output", str(null))
    assert code == 0, err
    assert stat.S_ISCHR(os.lstat(null).st_mode)
    assert not [p for p in null.parent.iterdir() if p.name.endswith(".tmp")]


def test_a_symlink_output_writes_its_target_and_stays_a_link(home, image, tmp_path, capsys):
    real = tmp_path / "kept" / "real.jsonl"
    real.parent.mkdir()
    real.write_text("old\n")
    real.chmod(0o600)
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    code, _, err = _predict(capsys, str(image), "--output", str(link))
    assert code == 0, err
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert json.loads(real.read_text())["path"] == str(image)
    assert stat.S_IMODE(real.stat().st_mode) == 0o600  # the replaced file keeps its permissions
    # a dangling link: its target is created, the link kept
    dangling = tmp_path / "dangling.jsonl"
    dangling.symlink_to(tmp_path / "kept" / "new.jsonl")
    code, _, err = _predict(capsys, str(image), "--output", str(dangling))
    assert code == 0, err
    assert dangling.is_symlink() and json.loads((tmp_path / "kept" / "new.jsonl").read_text())["model"] == "vit"


def test_a_fifo_output_is_written_to_its_reader(home, image, tmp_path, capsys):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    received: list[bytes] = []

    def reader():
        with open(fifo, "rb") as f:
            received.append(f.read())

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    code, _, err = _predict(capsys, str(image), "--output", str(fifo))
    thread.join(timeout=30)
    assert code == 0, err
    assert not thread.is_alive(), "the FIFO's reader was left waiting"
    assert json.loads(received[0])["path"] == str(image)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_dash_is_standard_output(home, image, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = _predict(capsys, str(image), "--output", "-")
    assert code == 0, err
    assert json.loads(out)["path"] == str(image)
    assert not (tmp_path / "-").exists() and "wrote" not in err


# -- issue 29 item 6: no temporary left on SIGTERM or Ctrl-C ---------------------------------------------------


def _copies(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    Image.new("RGB", (40, 40), "blue").save(folder / "img0000.png")
    data = (folder / "img0000.png").read_bytes()
    for i in range(1, n):
        (folder / f"img{i:04d}.png").write_bytes(data)


def _ctrl_c_as_on_a_terminal() -> None:
    """In the child, before exec: SIGINT at its default, as a command started from a terminal has it.  A test
    suite started in the background of a non-interactive shell (`cmd &`, nohup) inherits SIGINT ignored, and
    Python keeps an inherited SIG_IGN, rightly: such a command is meant to survive Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_midway(tiny_home: Path, folder: Path, target: Path, sig: int) -> tuple[int, str]:
    """Start predict --output ``target`` on ``folder``, send ``sig`` once its temporary file is there and
    some records are written; (exit status, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REVERSE_SD_")}
    env.update(REVERSE_SD_HOME=str(tiny_home), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = popen_cli(
        ["predict", str(folder), "--model", "vit", "--batch-size", "1", "--output", str(target)],
        env,
        preexec_fn=_ctrl_c_as_on_a_terminal,
    )
    try:
        deadline = time.monotonic() + 200
        # Signal as soon as the temporary file holds records, well before the last of the images is done.
        while not [p for p in target.parent.iterdir() if p.name.endswith(".tmp") and p.stat().st_size > 0]:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no temporary output file with records appeared"
            time.sleep(0.01)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def test_sigterm_or_ctrl_c_during_output_leaves_no_temporary_and_the_old_file(tiny_home, tmp_path):
    folder = tmp_path / "many"
    _copies(folder, 3000)  # seconds of work at batch size 1: the signal lands while records are written
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / "predictions.jsonl"
    target.write_text("previous\n")
    for sig, status, last in ((signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")):
        code, err = _interrupt_midway(tiny_home, folder, target, sig)
        assert code == status, err[-2000:]
        assert [p.name for p in out_dir.iterdir()] == ["predictions.jsonl"]
        assert target.read_text() == "previous\n"
        assert "Traceback" not in err and err.strip().splitlines()[-1] == last


# -- issue 29 item 3: --batch-size has a cap ---------------------------------------------------------------------


def test_batch_size_above_the_cap_is_refused_in_one_line(home, image, capsys):
    from pipeline.inputs import MAX_BATCH_SIZE

    assert MAX_BATCH_SIZE == 256
    with pytest.raises(SystemExit) as info:
        cli.main(["predict", str(image), "--batch-size", "100000"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("argument --batch-size: 100000 is above the cap of 256 images per forward pass")
    code, _, err = _predict(capsys, str(image), "--batch-size", "256")
    assert code == 0, err
    text = cli.build_parser()._subparsers._group_actions[0].choices["predict"].format_help()
    assert "at most 256" in " ".join(text.split()) and "(default: 32)" in text


def test_the_python_api_refuses_an_unbounded_batch(tiny_home):
    from pipeline.predictor import PromptPredictor

    with pytest.raises(ValueError, match=r"outside 1\.\.256"):
        PromptPredictor(str(tiny_home), model="vit", device="cpu", batch_size=100_000)


def test_a_symlink_to_a_pipe_writes_the_pipe(tiny_home, image, tmp_path):
    """A private /dev/stdout: a symlink to /proc/self/fd/1, which is the pipe to this test. It is followed
    and written in place, never replaced by a file (nor is a temporary made beside /proc's entry)."""
    link = tmp_path / "stdout"
    link.symlink_to("/proc/self/fd/1")
    env = {k: v for k, v in os.environ.items() if not k.startswith("REVERSE_SD_")}
    env.update(REVERSE_SD_HOME=str(tiny_home), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = run_cli(["predict", str(image), "--model", "vit", "--output", str(link)], env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["path"] == str(image)
    assert link.is_symlink() and os.readlink(link) == "/proc/self/fd/1"
