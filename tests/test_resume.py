"""--resume: per-wave checkpoints give a byte-identical output after an interruption; SIGTERM/SIGINT leave no
partial output and no temp files; a checkpoint of another run, or none, is refused with one line."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from qronos_onnx import checkpoint as ck
from qronos_onnx.api import quantize
from qronos_onnx.capture.frontier import FrontierStore
from qronos_onnx.config import load_recipe
from qronos_onnx.errors import ConfigError

from . import tiny_models as tm

REPO = Path(__file__).resolve().parent.parent


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


class _Stop(KeyboardInterrupt):
    pass


def _interrupt_after(monkeypatch, k: int) -> list[int]:
    """Raise KeyboardInterrupt right after the k-th checkpoint is written (as Ctrl-C would, between waves)."""
    saved: list[int] = []
    orig = ck.Checkpoint.save

    def save(self, *args, **kwargs):
        orig(self, *args, **kwargs)
        saved.append(self.done)
        if len(saved) == k:
            raise _Stop()

    monkeypatch.setattr(ck.Checkpoint, "save", save)
    return saved


CASES = {
    # name: (model, samples, recipe, overrides); small max_memory: part of the frontier is spilled (hard links)
    "transformer-w4": (lambda: tm.transformer(n_blocks=2), lambda: tm.transformer_inputs(n=6, seq=8), "w4",
                       {"capture.max_memory": 20_000}),
    "shared-weight-gptq": (tm.residual_mlp, tm.mlp_inputs, "w4", {"rounding.algorithm": "gptq"}),
    "cnn-w8a8": (tm.cnn, tm.cnn_inputs, "w8a8", {}),
    "transformer-mxfp4-local": (lambda: tm.transformer(n_blocks=1), lambda: tm.transformer_inputs(n=4, seq=8),
                                "mxfp4", {"capture.reference": "local"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_after_any_wave_is_byte_identical(case, tmp_path, monkeypatch, one_torch_thread):
    make_model, make_samples, recipe, overrides = CASES[case]
    model = _save(make_model(), tmp_path / "m.onnx")
    samples = make_samples()
    cfg = load_recipe(recipe).override(overrides)
    ref = quantize(model, samples, tmp_path / "ref.onnx", cfg, quiet=True)
    assert not ck.checkpoint_dir(tmp_path / "ref.onnx").exists(), "a finished run deletes its checkpoint"
    todo, tried = [1], []
    while todo:
        k = todo.pop(0)
        tried.append(k)
        out = tmp_path / f"q{k}.onnx"
        with monkeypatch.context() as m:
            _interrupt_after(m, k)
            with pytest.raises(KeyboardInterrupt) as info:
                quantize(model, samples, out, cfg, quiet=True)
        done, total, has_ckpt = info.value.qronos_progress
        assert done == k and has_ckpt and total >= k
        if k == 1:  # then after the second wave and after the last (only the export left to do)
            todo = sorted({2, total} & set(range(2, total + 1)))
        assert not out.exists()
        manifest = json.loads((ck.checkpoint_dir(out) / ck.MANIFEST).read_text())
        assert manifest["done"] == k
        res = quantize(model, samples, out, cfg, quiet=True, resume=True)
        assert _sha(out) == _sha(tmp_path / "ref.onnx"), f"resumed after wave {k} of {total}: output differs"
        assert [(r.weight, r.rel_error, r.damping) for r in res.layers] == \
            [(r.weight, r.rel_error, r.damping) for r in ref.layers]
        assert not ck.checkpoint_dir(out).exists()
    assert len(tried) >= 2


def test_resume_may_change_max_memory_and_torn_save_keeps_previous_wave(tmp_path, monkeypatch, one_torch_thread):
    model = _save(tm.transformer(n_blocks=2), tmp_path / "m.onnx")
    samples = tm.transformer_inputs(n=6, seq=8)
    cfg = load_recipe("w4")
    quantize(model, samples, tmp_path / "ref.onnx", cfg, quiet=True)
    out = tmp_path / "q.onnx"
    orig_write = ck.Checkpoint._write_bytes
    calls = []

    def torn(self, name, data):  # the 3rd manifest write dies after its arrays were written, before the rename
        calls.append(name)
        if len(calls) == 3:
            (self.dir / f".{name}.999.tmp").write_bytes(data[: len(data) // 2])
            raise KeyboardInterrupt
        orig_write(self, name, data)

    with monkeypatch.context() as m:
        m.setattr(ck.Checkpoint, "_write_bytes", torn)
        with pytest.raises(KeyboardInterrupt) as info:
            quantize(model, samples, out, cfg, quiet=True)
    assert info.value.qronos_progress[0] == 2  # the manifest still says wave 2
    assert ck.read_manifest(out)["done"] == 2
    # a different RAM budget changes where the frontier lives, not the result: accepted
    quantize(model, samples, out, cfg.override({"capture.max_memory": 5_000}), quiet=True, resume=True)
    assert _sha(out) == _sha(tmp_path / "ref.onnx")


def test_fresh_run_removes_stale_checkpoint(tmp_path, monkeypatch):
    model = _save(tm.residual_mlp(), tmp_path / "m.onnx")
    out = tmp_path / "q.onnx"
    with monkeypatch.context() as m:
        _interrupt_after(m, 1)
        with pytest.raises(KeyboardInterrupt):
            quantize(model, tm.mlp_inputs(), out, load_recipe("w4"), quiet=True)
    stale = ck.checkpoint_dir(out)
    (stale / "f999999999.npy").write_bytes(b"junk")
    with monkeypatch.context() as m:
        _interrupt_after(m, 1)
        with pytest.raises(KeyboardInterrupt):
            quantize(model, tm.mlp_inputs(n=3), out, load_recipe("w4"), quiet=True)  # no --resume: starts over
    assert not (stale / "f999999999.npy").exists()
    assert ck.read_manifest(out)["fingerprint"]["calibration"]["samples"] == 3


def test_no_checkpoint_option_writes_none(tmp_path, monkeypatch):
    model = _save(tm.residual_mlp(), tmp_path / "m.onnx")
    out = tmp_path / "q.onnx"
    seen = []
    orig = ck.Checkpoint.save
    monkeypatch.setattr(ck.Checkpoint, "save", lambda self, *a, **k: seen.append(1) or orig(self, *a, **k))
    res = quantize(model, tm.mlp_inputs(), out, load_recipe("w4"), quiet=True, checkpoint=False)
    assert not seen and "checkpoint" not in res.timings
    res = quantize(model, tm.mlp_inputs(), tmp_path / "q2.onnx", load_recipe("w4"), quiet=True)
    assert seen and res.timings["checkpoint"] > 0


def test_resume_refuses_other_runs_checkpoint_api(tmp_path, monkeypatch):
    model = _save(tm.residual_mlp(), tmp_path / "m.onnx")
    out = tmp_path / "q.onnx"
    with pytest.raises(ConfigError, match=r"^no checkpoint for .*q\.onnx at .*q\.onnx\.qronos-resume; run without "
                                          r"--resume$"):
        quantize(model, tm.mlp_inputs(), out, load_recipe("w4"), quiet=True, resume=True)
    with monkeypatch.context() as m:
        _interrupt_after(m, 1)
        with pytest.raises(KeyboardInterrupt):
            quantize(model, tm.mlp_inputs(), out, load_recipe("w4"), quiet=True)
    with pytest.raises(ConfigError, match="different config/model: calibration data differs"):
        quantize(model, tm.mlp_inputs(seed=5), out, load_recipe("w4"), quiet=True, resume=True)
    with pytest.raises(ConfigError, match=r"different config/model: rounding.algorithm 'qronos' -> 'gptq'"):
        quantize(model, tm.mlp_inputs(), out, load_recipe("w4").override({"rounding.algorithm": "gptq"}),
                 quiet=True, resume=True)
    os.utime(model, ns=(0, 0))
    with pytest.raises(ConfigError, match="different config/model: input model changed"):
        quantize(model, tm.mlp_inputs(), out, load_recipe("w4"), quiet=True, resume=True)
    assert ck.read_manifest(out)["done"] == 1, "a refused resume leaves the checkpoint alone"


def test_quantize_installs_sigterm_handler_only_when_unset(tmp_path, monkeypatch):
    model = _save(tm.residual_mlp(), tmp_path / "m.onnx")
    during = []
    orig = ck.Checkpoint.save
    monkeypatch.setattr(ck.Checkpoint, "save",
                        lambda self, *a, **k: during.append(signal.getsignal(signal.SIGTERM)) or orig(self, *a, **k))
    before = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        quantize(model, tm.mlp_inputs(), tmp_path / "a.onnx", load_recipe("w4"), quiet=True)
        assert during[-1] is ck._raise_terminated
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "restored afterwards"

        def mine(signum, frame):
            pass

        signal.signal(signal.SIGTERM, mine)
        quantize(model, tm.mlp_inputs(), tmp_path / "b.onnx", load_recipe("w4"), quiet=True)
        assert during[-1] is mine and signal.getsignal(signal.SIGTERM) is mine, "a user's handler is left alone"
    finally:
        signal.signal(signal.SIGTERM, before if before is not None else signal.SIG_DFL)


def test_frontier_store_serials_survive_restore():
    with FrontierStore(max_memory=100) as store:
        store.put("a", np.zeros(4, np.float32))
        store.put("b", np.zeros(40, np.float32))  # 160 bytes: spilled
        store.borrow("c", np.ones(2))
        entries = {k: (serial, spill) for k, _, serial, spill in store.entries()}
        assert entries["a"] == (0, None) and entries["b"][0] == 1 and entries["b"][1].exists()
        assert entries["c"] == (None, None)
    with FrontierStore(max_memory=100) as store:
        store.put("b", np.zeros(40, np.float32), serial=7)
        store.put("d", np.zeros(1, np.float32))
        assert {k: s for k, _, s, _ in store.entries()} == {"b": 7, "d": 8}


# ------------------------------------------------------------------------------------------------ real processes

# the real CLI, only slowed down after each checkpoint so that the signal lands mid-run on any machine
_SLOW_CLI = """
import sys, time
from qronos_onnx import checkpoint as ck
orig = ck.Checkpoint.save
def save(self, *a, **k):
    orig(self, *a, **k)
    time.sleep(0.3)
ck.Checkpoint.save = save
from qronos_onnx.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _env(tmp: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"}


def _cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qronos_onnx", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.fixture()
def cli_files(tmp_path):
    model = _save(tm.transformer(n_blocks=2), tmp_path / "model.onnx")
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, s in enumerate(tm.transformer_inputs(n=6, seq=8)):
        np.savez(calib / f"s{i}.npz", **s)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    return model, calib, tmp


def _signal_mid_run(args: list[str], out: Path, tmp: Path, env: dict, sig: int) -> tuple[int, str]:
    """Start the (slowed) CLI, send ``sig`` once wave 2 is checkpointed and the frontier has spilled."""
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CLI, "quantize", *args, "-o", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a test run started in the background inherits SIGINT ignored: give the child Ctrl-C
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    manifest = ck.checkpoint_dir(out) / ck.MANIFEST
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.exists() and json.loads(manifest.read_text())["done"] >= 2:  # from wave 2 on the frontier spills
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before a checkpoint was seen: " + proc.communicate()[1]
    assert list(tmp.glob("qronos-frontier-*")), "the frontier spills here: else the checks would prove nothing"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


ARGS = ["--w4", "--max-memory", "2000", "--quiet"]


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_leaves_no_temp_files_and_resume_is_byte_identical(cli_files, tmp_path, sig, code):
    model, calib, tmp = cli_files
    env = _env(tmp)
    args = [str(model), "--calib", str(calib), *ARGS]
    ref = _cli("quantize", *args, "-o", str(tmp_path / "ref.onnx"), env=env)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "out" / "q.onnx"
    rc, err = _signal_mid_run(args, out, tmp, env, sig)
    assert rc == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qronos-onnx: interrupted after wave ") \
        and lines[0].endswith("; rerun with --resume to continue"), err
    assert not list(tmp.glob("qronos-frontier-*")), "the spill folder is deleted"
    assert sorted(p.name for p in out.parent.iterdir()) == ["q.onnx.qronos-resume"], "no partial output"
    assert not [p for p in ck.checkpoint_dir(out).iterdir() if p.name.endswith(".tmp")]
    done = ck.read_manifest(out)["done"]
    assert lines[0].startswith(f"qronos-onnx: interrupted after wave {done} of ")

    res = _cli("quantize", *args, "-o", str(out), "--resume", env=env)
    assert res.returncode == 0, res.stderr
    assert _sha(out) == _sha(tmp_path / "ref.onnx")
    assert not ck.checkpoint_dir(out).exists() and not list(tmp.glob("qronos-frontier-*"))


def test_cli_resume_refusals_are_one_line(cli_files, tmp_path, monkeypatch):
    model, calib, tmp = cli_files
    env = _env(tmp)
    out = tmp_path / "q.onnx"
    args = [str(model), "--calib", str(calib), "--w4", "--quiet", "-o", str(out)]
    r = _cli("quantize", *args, "--resume", env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"qronos-onnx: error: no checkpoint for {out} at {out}.qronos-resume; "
                               "run without --resume"), r.stderr
    with monkeypatch.context() as m:  # a checkpoint of wave 1, made in this process through the API
        _interrupt_after(m, 1)
        with pytest.raises(KeyboardInterrupt):
            quantize(model, calib, out, load_recipe("w4"), quiet=True)
    r = _cli("quantize", *args, "--bits", "3", "--resume", env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"qronos-onnx: error: checkpoint at {out}.qronos-resume was made with a different "
                               "config/model: weights.bits 4 -> 3"), r.stderr
    assert not out.exists() and ck.read_manifest(out)["done"] == 1


def test_resume_after_sigkill_removes_the_dead_runs_spill_folder(cli_files, tmp_path):
    model, calib, tmp = cli_files
    env = _env(tmp)
    args = [str(model), "--calib", str(calib), *ARGS]
    out = tmp_path / "q.onnx"
    rc, _ = _signal_mid_run(args, out, tmp, env, signal.SIGKILL)  # out of memory: no cleanup can run
    assert rc == -signal.SIGKILL
    dead = ck.read_manifest(out)["spill_dir"]
    assert dead and Path(dead).is_dir() and not out.exists()
    res = _cli("quantize", *args, "-o", str(out), "--resume", env=env)
    assert res.returncode == 0, res.stderr
    assert not Path(dead).exists() and not list(tmp.glob("qronos-frontier-*"))
    ref = tmp_path / "ref.onnx"
    assert _cli("quantize", *args, "-o", str(ref), env=env).returncode == 0
    assert _sha(out) == _sha(ref)


def test_ctrl_c_during_a_save_waits_for_it(tmp_path, monkeypatch):
    model = _save(tm.transformer(n_blocks=1), tmp_path / "m.onnx")
    out = tmp_path / "q.onnx"
    orig = ck.Checkpoint._write_bytes
    calls = []

    def write(self, name, data):  # Ctrl-C arrives on the 2nd save, after its arrays, before its manifest
        calls.append(name)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        orig(self, name, data)

    monkeypatch.setattr(ck.Checkpoint, "_write_bytes", write)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # background jobs start with SIGINT ignored
    try:
        with pytest.raises(KeyboardInterrupt) as info:
            quantize(model, tm.transformer_inputs(n=2), out, load_recipe("w4"), quiet=True)
        assert info.value.qronos_progress[0] == 2 and ck.read_manifest(out)["done"] == 2
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)


class _FakeEngine:
    def __init__(self, kept: dict):
        self.frontier = FrontierStore(1 << 20)
        self.tmp_dir = None
        self._kept = kept

    def kept_weights(self):
        return dict(self._kept)


def test_checkpoint_never_reuses_a_kept_weight_file_name(tmp_path):
    out = tmp_path / "q.onnx"
    a, b, c, p, q = (np.full(3, v, np.float32) for v in range(5))
    ckpt = ck.Checkpoint.fresh(out, {"x": 1})
    ckpt.save(_FakeEngine({"a": a, "b": b, "c": c}), 0, 1, 3, {}, [])
    ckpt.save(_FakeEngine({"c": c}), 1, 2, 3, {}, [])  # a and b are read by no later segment: their files go
    ckpt = ck.Checkpoint.load(out, {"x": 1})  # a resumed run
    ckpt.save(_FakeEngine({"c": c, "p": p, "q": q}), 2, 3, 3, {}, [])
    kept = ck.Checkpoint.load(out, {"x": 1}).engine_state().quant_w()
    assert {k: float(v[0]) for k, v in kept.items()} == {"c": 2.0, "p": 3.0, "q": 4.0}
