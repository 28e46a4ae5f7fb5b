"""Several compiles at once, and compiles that are stopped: what they share stays whole.

Compiles may share a cache (specs in one folder, ``DISTILLC_CACHE``) and a work directory; a
compile may be killed at any moment.  Each test here makes the overlap happen on purpose, with a
plugin that holds one compile inside a step until the other has got where the test wants it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import distillc
from distillc.artifacts import OnnxModel
from distillc.cache import ArtifactStore
from distillc.errors import DistillcError
from distillc.run import compile_spec
from distillc.plugin_manager import load_plugins
from distillc.progress import SilentProgress
from tests.conftest import TINY_HEADER, tiny_spec_text

#: How long a held compile waits for the other one before it gives up (the test then fails).
PATIENCE_S = 120.0


class HoldStep:
    """A plugin that holds a compile inside ``step_id`` until ``release`` is set."""

    def __init__(self, step_id: str):
        self.step_id = step_id
        self.entered = threading.Event()
        self.release = threading.Event()
        self.scratch: Path | None = None

    @distillc.hookimpl(wrapper=True)
    def distillc_run_pass(self, step, artifact, context):
        if step.id == self.step_id:
            self.scratch = context.scratch
            (context.scratch / "mine").write_text("in use")
            self.entered.set()
            self.release.wait(PATIENCE_S)
        return (yield)


def in_thread(fn, **kwargs) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        try:
            out["result"] = fn(**kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def wait_for(condition, what: str, timeout: float = PATIENCE_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_a_second_compile_waits_for_the_step_another_runs_and_reuses_it(tmp_path):
    """Two specs in one folder (one cache) share a teacher; both compile at once.  The second
    one waits for the first one's teacher step, says so, and then reads its entry."""
    for name in ("one", "two"):
        (tmp_path / f"{name}.toml").write_text(tiny_spec_text().replace('name = "tiny"', f'name = "{name}"'))
    hold = HoldStep("teacher:vit")
    first, first_out = in_thread(compile_spec, spec_path=tmp_path / "one.toml", until="teacher:vit",
                                 progress=SilentProgress(), plugins=load_plugins([hold]))
    assert hold.entered.wait(PATIENCE_S)
    progress = SilentProgress()
    second, second_out = in_thread(compile_spec, spec_path=tmp_path / "two.toml", until="teacher:vit",
                                   progress=progress, plugins=load_plugins())
    try:
        wait_for(lambda: any("waiting for another compile" in m for m in progress.messages) or not second.is_alive(),
                 "the second compile to wait")
    finally:
        hold.release.set()
        first.join(PATIENCE_S)
        second.join(PATIENCE_S)
    assert "error" not in first_out and "error" not in second_out, (first_out, second_out)
    assert first_out["result"].ran == ["teacher:vit"]
    assert second_out["result"].ran == []
    assert [row["status"] for row in second_out["result"].report["plan"]][:1] == ["cached"]
    assert any("waiting for another compile that is running teacher:vit" in m for m in progress.messages)


def test_compiles_sharing_a_work_directory_keep_their_scratch_folders(tmp_path):
    """While one compile is inside a step, another one runs and publishes into the same work
    directory: the first one's scratch folder is left alone."""
    (tmp_path / "one.toml").write_text(tiny_spec_text())
    (tmp_path / "two.toml").write_text(tiny_spec_text(seed=1))  # other keys: nothing to wait for
    workdir = tmp_path / "shared-build"
    hold = HoldStep("teacher:vit")
    first, first_out = in_thread(compile_spec, spec_path=tmp_path / "one.toml", workdir=workdir, until="teacher:vit",
                                 progress=SilentProgress(), plugins=load_plugins([hold]))
    try:
        assert hold.entered.wait(PATIENCE_S)
        second = compile_spec(tmp_path / "two.toml", workdir=workdir, until="teacher:vit", progress=SilentProgress(),
                              plugins=load_plugins())
        assert second.ran == ["teacher:vit"]
        assert (hold.scratch / "mine").read_text() == "in use"
    finally:
        hold.release.set()
        first.join(PATIENCE_S)
    assert "error" not in first_out, first_out
    assert sorted(p.name for p in (workdir / ".scratch").iterdir()) == []  # both cleaned up after themselves


def test_an_interrupted_publish_leaves_the_previous_outputs_whole(write_spec, monkeypatch):
    """A compile stopped while it copies the bundle into the work directory leaves the previous
    bundle as it was, and no report.json that names files which are not there."""
    import shutil

    from distillc.passes.backend import testing

    path = write_spec(TINY_HEADER.format(name="ties") + '[student]\nonnx = "ties.onnx"\n[target]\nuse = "host"\n')
    testing.tie_net(path.parent / "ties.onnx", in_channels=1, size=8, gain=3)
    first = compile_spec(path, progress=SilentProgress(), plugins=load_plugins())
    bundle = Path(first.outputs["bundle"])
    before = {p.relative_to(bundle): p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
    real_copytree, copied = shutil.copytree, []

    def copy_then_stop(src, dst, *args, **kwargs):
        if len(copied) == 2:
            raise KeyboardInterrupt  # a Ctrl-C in the middle of the bundle
        copied.append(str(src))
        return shutil.copy2(src, dst, *args, **kwargs)

    def copytree_then_stop(src, dst, *args, **kwargs):  # copytree calls itself for subfolders
        args = list(args) + [None] * (3 - len(args))
        args[2] = copy_then_stop  # (symlinks, ignore, copy_function, ...)
        kwargs.pop("copy_function", None)
        return real_copytree(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copytree", copytree_then_stop)
    with pytest.raises(KeyboardInterrupt):
        compile_spec(path, progress=SilentProgress(), plugins=load_plugins())
    monkeypatch.undo()
    assert len(copied) == 2
    after = {p.relative_to(bundle): p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
    assert after == before
    report = bundle.parent / "report.json"
    if report.exists():
        assert all(Path(p).exists() for p in json.loads(report.read_text())["outputs"].values())
    assert list((bundle.parent / ".scratch").iterdir()) == []


def test_what_a_killed_writer_left_in_the_cache_is_removed_and_a_live_writers_is_not(tmp_path):
    from filelock import FileLock

    store = ArtifactStore(tmp_path / "cache")
    tmp = store.root / "tmp"
    tmp.mkdir(parents=True)
    for name in ("dead", "live", "old-style", "young-style"):
        (tmp / name).mkdir()
        (tmp / name / "model.onnx").write_bytes(b"partial")
    (tmp / "dead.lock").touch()  # its writer's lock died with it
    live = FileLock(tmp / "live.lock")
    live.acquire()  # a writer that is still at work (another open file holds the lock)
    hours_ago = time.time() - 7 * 3600
    os.utime(tmp / "old-style", (hours_ago, hours_ago))  # no lock file: an older distillc's, long dead
    file = tmp_path / "m.onnx"
    file.write_bytes(b"model")
    try:
        store.save("cd" * 32, OnnxModel(path=file), {"metrics": {}})
        assert sorted(p.name for p in tmp.iterdir()) == ["live", "live.lock", "young-style"]
    finally:
        live.release()
    store.save("ef" * 32, OnnxModel(path=file), {"metrics": {}})
    assert sorted(p.name for p in tmp.iterdir()) == ["young-style"]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def test_a_timed_out_tool_is_killed_with_the_processes_it_started(tmp_path):
    from distillc.targets.toolchain import run_tool

    pid_file = tmp_path / "child.pid"
    with pytest.raises(DistillcError, match="did not finish within 1 s"):
        run_tool(["sh", "-c", f'sleep 60 & echo $! > "{pid_file}"; wait'], what="a slow tool", timeout=1)
    child = int(pid_file.read_text())
    try:
        assert _wait_gone([child]) == []
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
def test_a_terminated_compile_leaves_no_compiler_running(write_spec, tmp_path):
    """``kill`` (SIGTERM) of ``distillc compile`` while verify.host runs gcc ends gcc and what gcc
    started, and exits as an interrupt does.  (The gcc here is a stand-in that never finishes.)"""
    from distillc.passes.backend import testing

    path = write_spec(TINY_HEADER.format(name="ties") + '[student]\nonnx = "ties.onnx"\n[target]\nuse = "host"\n')
    testing.tie_net(path.parent / "ties.onnx", in_channels=1, size=8, gain=3)
    fake = tmp_path / "fake-bin"
    fake.mkdir()
    pids = tmp_path / "pids"
    pids.mkdir()
    (fake / "gcc").write_text(f'#!/bin/sh\necho $$ > "{pids}/gcc.tmp"; mv "{pids}/gcc.tmp" "{pids}/gcc"\n'
                              f'sleep 120 &\necho $! > "{pids}/child.tmp"; mv "{pids}/child.tmp" "{pids}/child"\nwait\n')
    (fake / "gcc").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "DISTILLC_DISABLE_PLUGIN_AUTOLOAD": "1"}
    compile_ = subprocess.Popen([sys.executable, "-c", "from distillc.cli import main; main()", "compile", str(path)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started: list[int] = []
    try:
        wait_for(lambda: (pids / "child").exists() or compile_.poll() is not None, "the compile to start gcc",
                 timeout=300)
        assert compile_.poll() is None, compile_.communicate()[0]
        started = [int((pids / name).read_text()) for name in ("gcc", "child")]
        compile_.send_signal(signal.SIGTERM)
        printed, _ = compile_.communicate(timeout=60)
        assert compile_.returncode == 130, printed
        assert "interrupted" in printed
        assert _wait_gone(started) == []
    finally:
        if compile_.poll() is None:
            compile_.kill()
        for pid in started:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
