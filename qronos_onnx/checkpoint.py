"""Per-wave checkpoints for ``--resume``, and SIGTERM as a clean interrupt.

After every completed wave, ``quantize()`` writes into ``OUTPUT.qronos-resume/`` (a folder beside the output):

* ``manifest.json``: the run's fingerprint (input model path, size and mtime; a SHA-256 of the loaded calibration
  samples; the resolved config; the tool version), the last completed wave, the LayerReports so far, and which
  files below hold the engine's state and the quantized weights;
* ``f<serial>.npy``: the capture frontier (every stream and calibration chunk; hard-linked from the spill folder
  when the array was spilled there, else written), ``w<i>.npy``: rounded weights later segments still compute
  with, ``q<wave>.npz``: codes, scales and zero points of the weights rounded in that wave.

Every file is immutable once written under its final name; arrays kept from one wave to the next are not written
again. The manifest is written last (tmp file, fsync, rename), so a kill at any moment leaves the previous wave's
checkpoint valid; files the manifest does not name are deleted at the next save or load. Nothing is unpickled:
arrays are read with ``allow_pickle=False`` and everything else is JSON.

``--resume`` restores the state and continues at the next wave; the output is byte-identical to an uninterrupted
run (the solvers' randomness is seeded per call, not drawn from a global stream). ``capture.max_memory`` may
differ on resume (it changes where the frontier lives, not the result); anything else that differs is refused.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .errors import ConfigError
from .formats import QuantizedWeight
from .formats.elements import ElementGrid
from .formats.grid import IntGrid

FORMAT_VERSION = 1
SUFFIX = ".qronos-resume"
MANIFEST = "manifest.json"
_GRIDS = {"IntGrid": IntGrid, "ElementGrid": ElementGrid}
# options that change where intermediate data lives, not what is computed: a resumed run may change them
_FREE_OPTIONS = ("capture.max_memory",)


def checkpoint_dir(output: str | os.PathLike) -> Path:
    """Where the checkpoints of ``output`` live: ``OUTPUT.qronos-resume/`` beside it."""
    out = Path(output).absolute()
    return out.with_name(out.name + SUFFIX)


# ------------------------------------------------------------------------------------------------ fingerprint

def fingerprint(model_path: str | os.PathLike, samples: Sequence[Mapping[str, np.ndarray]],
                config: dict[str, Any]) -> dict[str, Any]:
    """What must be equal for a checkpoint to continue a run: model file, calibration samples, config, version."""
    model = Path(model_path).absolute()
    files = {}
    for path in (model, model.with_name(model.name + ".data")):
        if path.exists():
            st = path.stat()
            files[str(path)] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    h = hashlib.sha256()
    for sample in samples:
        for name in sorted(sample):
            arr = np.ascontiguousarray(sample[name])
            h.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
            h.update(arr.data)
    cfg = json.loads(json.dumps(config))
    for dotted in _FREE_OPTIONS:
        node = cfg
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.get(key, {})
        node.pop(leaf, None)
    return {"tool": __version__, "model": files, "calibration": {"samples": len(samples), "sha256": h.hexdigest()},
            "config": cfg}


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def fingerprint_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences, most important first (empty: the checkpoint fits)."""
    diffs = []
    if old.get("tool") != new.get("tool"):
        diffs.append(f"tool version {old.get('tool')} -> {new.get('tool')}")
    if old.get("model") != new.get("model"):
        diffs.append("input model changed (path, size or modification time)")
    if old.get("calibration") != new.get("calibration"):
        o, n = old.get("calibration", {}), new.get("calibration", {})
        diffs.append("calibration data differs"
                     + (f" ({o.get('samples')} -> {n.get('samples')} samples)" if o.get("samples") != n.get("samples")
                        else ""))
    fo, fn = _flatten(old.get("config", {})), _flatten(new.get("config", {}))
    for key in sorted(set(fo) | set(fn)):
        if fo.get(key) != fn.get(key):
            diffs.append(f"{key} {fo.get(key)!r} -> {fn.get(key)!r}")
    return diffs


# ------------------------------------------------------------------------------------------------ the store

@dataclasses.dataclass
class EngineState:
    """What CaptureEngine needs to continue after ``wave``: frontier entries and the kept rounded weights.

    ``frontier`` yields ``(key, serial, array)``; ``array`` is None for an entry the engine borrows from the
    calibration chunks (rebuilt from the calibration data on resume). Arrays are loaded one at a time.
    """

    wave: int
    frontier: Any  # callable -> Iterator[tuple[tuple, int | None, np.ndarray | None]]
    quant_w: Any  # callable -> dict[str, np.ndarray]
    next_serial: int


class Checkpoint:
    """The checkpoint folder of one output. ``save()`` after each wave; ``remove()`` once the output is written."""

    def __init__(self, directory: Path, fp: dict[str, Any], manifest: dict[str, Any] | None = None):
        self.dir = directory
        self.fp = fp
        self.manifest = manifest
        self.seconds = 0.0  # spent writing checkpoints in this process
        self.bytes_written = 0  # array bytes written (hard links from the spill folder not counted)
        self.saves = 0
        self._present: set[str] = set()
        self._weight_file: dict[str, str] = {}  # quantized weight name -> npz holding it
        self._weight_meta: dict[str, dict] = {}
        self._quant_w_file: dict[str, str] = {}
        self._next_w = 0  # w<i>.npy: i never reused (a kept file may have any number)
        if manifest is not None:
            self._present = set(_referenced(manifest))
            self._weight_meta = dict(manifest["weights"])
            self._quant_w_file = dict(manifest["quant_w"])
            self._next_w = 1 + max((int(f[1:-4]) for f in self._quant_w_file.values()), default=-1)

    # -- opening
    @classmethod
    def fresh(cls, output: str | os.PathLike, fp: dict[str, Any]) -> "Checkpoint":
        """A new run: any checkpoint of the same output is stale and removed."""
        directory = checkpoint_dir(output)
        shutil.rmtree(directory, ignore_errors=True)
        return cls(directory, fp)

    @classmethod
    def load(cls, output: str | os.PathLike, fp: dict[str, Any]) -> "Checkpoint":
        """The checkpoint to resume from; ConfigError (one line) when there is none or it belongs to another run."""
        directory = checkpoint_dir(output)
        manifest = read_manifest(output)
        diffs = fingerprint_diff(manifest.get("fingerprint", {}), fp)
        if diffs:
            shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
            raise ConfigError(f"checkpoint at {directory} was made with a different config/model: {shown}; rerun "
                              "with the same inputs and options, or without --resume to start over")
        ckpt = cls(directory, fp, manifest)
        ckpt._sweep()
        spill = manifest.get("spill_dir")
        if spill and Path(spill).name.startswith("qronos-frontier-"):  # left behind by a run killed outright (OOM)
            shutil.rmtree(spill, ignore_errors=True)
        return ckpt

    # -- what was done
    @property
    def done(self) -> int:
        return int(self.manifest["done"]) if self.manifest else 0

    @property
    def wave(self) -> int:
        return int(self.manifest["wave"]) if self.manifest else -1

    def engine_state(self) -> EngineState:
        m = self.manifest
        assert m is not None

        def frontier() -> Iterator[tuple[tuple, int | None, np.ndarray | None]]:
            for e in m["frontier"]:
                key = tuple(e["key"])
                if e.get("borrowed"):
                    yield key, None, None
                else:
                    yield key, int(e["serial"]), np.load(self.dir / e["file"], allow_pickle=False)

        def quant_w() -> dict[str, np.ndarray]:
            return {n: np.load(self.dir / f, allow_pickle=False) for n, f in m["quant_w"].items()}

        return EngineState(wave=int(m["wave"]), frontier=frontier, quant_w=quant_w,
                           next_serial=int(m["next_serial"]))

    def quantized(self) -> dict[str, QuantizedWeight]:
        """The weights rounded so far, in the order they were rounded."""
        m = self.manifest
        if m is None:
            return {}
        out: dict[str, QuantizedWeight] = {}
        opened: dict[str, Any] = {}
        try:
            for name in m["weight_order"]:
                meta = m["weights"][name]
                if meta["file"] not in opened:
                    opened[meta["file"]] = np.load(self.dir / meta["file"], allow_pickle=False)
                z = opened[meta["file"]]
                i = meta["index"]
                out[name] = QuantizedWeight(codes=torch.from_numpy(z[f"{i}.codes"]),
                                            grid=_grid_from(meta["grid"], z, i), info=meta["info"])
        finally:
            for z in opened.values():
                z.close()
        return out

    def reports(self) -> list[dict]:
        return list(self.manifest["reports"]) if self.manifest else []

    # -- writing
    def save(self, engine, wave: int, done: int, total: int, quantized: Mapping[str, QuantizedWeight],
             reports: Sequence[Any]) -> None:
        """Checkpoint the state after ``wave`` (``done`` of ``total`` waves with targets are complete).

        Ctrl-C and SIGTERM wait until the save is complete (they are held back meanwhile), so that what the
        interrupted run reports is what is on disk; a harder kill mid-save leaves the previous wave's checkpoint.
        """
        with _signals_deferred():
            self._save(engine, wave, done, total, quantized, reports)

    def _save(self, engine, wave, done, total, quantized, reports) -> None:
        t0 = time.perf_counter()
        self.dir.mkdir(parents=True, exist_ok=True)
        frontier = []
        for key, arr, serial, spill in engine.frontier.entries():
            if serial is None:
                frontier.append({"key": list(key), "borrowed": True})
                continue
            name = f"f{serial:09d}.npy"
            if name not in self._present:
                self._write_array(name, arr, spill)
            frontier.append({"key": list(key), "serial": serial, "file": name})
        quant_w = {}
        for wname, arr in engine.kept_weights().items():
            fname = self._quant_w_file.get(wname)
            if fname is None:
                fname, self._next_w = f"w{self._next_w:06d}.npy", self._next_w + 1
            if fname not in self._present:
                self._write_array(fname, arr)
            self._quant_w_file[wname] = quant_w[wname] = fname
        new = [n for n in quantized if n not in self._weight_meta]
        if new:
            fname = f"q{wave:06d}.npz"
            arrays: dict[str, np.ndarray] = {}
            for i, n in enumerate(new):
                qw = quantized[n]
                arrays[f"{i}.codes"] = qw.codes.cpu().numpy()
                grid_meta = _grid_meta(qw.grid, arrays, i)
                self._weight_meta[n] = {"file": fname, "index": i, "grid": grid_meta, "info": qw.info}
            self._write_npz(fname, arrays)
        manifest = {
            "format": FORMAT_VERSION, "fingerprint": self.fp, "wave": wave, "done": done, "total": total,
            "next_serial": engine.frontier.next_serial,
            "spill_dir": str(engine.tmp_dir) if engine.tmp_dir is not None else None, "frontier": frontier, "quant_w": quant_w,
            "weight_order": list(quantized), "weights": {n: self._weight_meta[n] for n in quantized},
            "reports": [dataclasses.asdict(r) if dataclasses.is_dataclass(r) else r for r in reports],
        }
        self._write_bytes(MANIFEST, json.dumps(manifest).encode())
        self.manifest = manifest  # only now: a kill before the rename leaves the previous wave's checkpoint
        self._sweep()
        self.saves += 1
        self.seconds += time.perf_counter() - t0

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- files
    def _sweep(self) -> None:
        """Delete every file the manifest does not name (older waves' arrays, tmp files of a killed write)."""
        keep = {MANIFEST, *(_referenced(self.manifest) if self.manifest else ())}
        for path in self.dir.iterdir() if self.dir.is_dir() else ():
            if path.name not in keep:
                path.unlink(missing_ok=True)
        self._present &= keep

    def _tmp(self, name: str) -> Path:
        return self.dir / f".{name}.{os.getpid()}.tmp"

    def _write_array(self, name: str, arr: np.ndarray, spill: Path | None = None) -> None:
        dst = self.dir / name
        tmp = self._tmp(name)
        if spill is not None:  # the spill file holds the same .npy bytes: link it (no copy) when on one filesystem
            try:
                os.link(spill, tmp)
                os.replace(tmp, dst)
                self._present.add(name)
                return
            except OSError:
                tmp.unlink(missing_ok=True)
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
        self.bytes_written += arr.nbytes
        self._present.add(name)

    def _write_npz(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        tmp = self._tmp(name)
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / name)
        self.bytes_written += sum(a.nbytes for a in arrays.values())
        self._present.add(name)

    def _write_bytes(self, name: str, data: bytes) -> None:
        tmp = self._tmp(name)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / name)


def open_checkpoint(output: str | os.PathLike, model_path: str | os.PathLike,
                    samples: Sequence[Mapping[str, np.ndarray]], config: dict[str, Any], resume: bool) -> Checkpoint:
    """The checkpoint to continue (``resume``), or a fresh one (a stale checkpoint of ``output`` is removed)."""
    fp = fingerprint(model_path, samples, config)
    return Checkpoint.load(output, fp) if resume else Checkpoint.fresh(output, fp)


@contextlib.contextmanager
def _signals_deferred():
    """Hold back Ctrl-C and our SIGTERM while the block runs; one that arrived is raised on leaving it.

    Done with Python-level handlers, not a signal mask: onnxruntime's and torch's worker threads do not share the
    main thread's mask, so a masked signal would be taken by one of them and still raised in the middle of the block.
    Handlers set by a user are left alone (only the main thread may set handlers; elsewhere nothing is deferred).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    saved = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if handler is signal.default_int_handler or handler is _raise_terminated:
            saved[sig] = handler
            signal.signal(sig, lambda signum, _frame: pending.append(signum))
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        if pending:
            saved[pending[0]](pending[0], None)  # raises KeyboardInterrupt / Terminated now


def read_manifest(output: str | os.PathLike) -> dict[str, Any]:
    directory = checkpoint_dir(output)
    path = directory / MANIFEST
    if not path.is_file():
        raise ConfigError(f"no checkpoint for {Path(output).absolute()} at {directory}; run without --resume")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"checkpoint at {directory} is unreadable ({err}); run without --resume") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        raise ConfigError(f"checkpoint at {directory} has an unknown format; run without --resume")
    return manifest


def _referenced(manifest: dict[str, Any]) -> Iterator[str]:
    for e in manifest["frontier"]:
        if "file" in e:
            yield e["file"]
    yield from manifest["quant_w"].values()
    for meta in manifest["weights"].values():
        yield meta["file"]


def _grid_meta(grid, arrays: dict[str, np.ndarray], i: int) -> dict[str, Any]:
    meta: dict[str, Any] = {"class": type(grid).__name__}
    if meta["class"] not in _GRIDS:
        raise TypeError(f"cannot checkpoint a {type(grid).__name__}")
    for f in dataclasses.fields(grid):
        value = getattr(grid, f.name)
        if isinstance(value, torch.Tensor):
            arrays[f"{i}.{f.name}"] = value.detach().cpu().numpy()
            meta[f.name] = {"array": True}
        elif isinstance(value, torch.dtype):
            meta[f.name] = {"dtype": str(value).removeprefix("torch.")}
        else:
            meta[f.name] = value
    return meta


def _grid_from(meta: dict[str, Any], z, i: int):
    cls = _GRIDS[meta["class"]]
    kwargs = {}
    for f in dataclasses.fields(cls):
        value = meta[f.name]
        if isinstance(value, dict) and value.get("array"):
            kwargs[f.name] = torch.from_numpy(z[f"{i}.{f.name}"])
        elif isinstance(value, dict) and "dtype" in value:
            kwargs[f.name] = getattr(torch, value["dtype"])
        else:
            kwargs[f.name] = value
    return cls(**kwargs)


# ------------------------------------------------------------------------------------------------ interrupts

class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so it unwinds like Ctrl-C (temp files deleted, no partial output)."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(f"signal {signum}")
        self.signum = signum


def _raise_terminated(signum, _frame) -> None:
    raise Terminated(signum)


def install_sigterm_handler() -> bool:
    """Turn SIGTERM into :class:`Terminated` if we are on the main thread and nobody set a handler; True if set."""
    if threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        return False
    signal.signal(signal.SIGTERM, _raise_terminated)
    return True


def sigterm_as_interrupt(func):
    """Decorator: SIGTERM unwinds ``func`` like Ctrl-C (only on the main thread, only if no handler is set)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        installed = install_sigterm_handler()
        try:
            return func(*args, **kwargs)
        finally:
            if installed and signal.getsignal(signal.SIGTERM) is _raise_terminated:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)

    return wrapper


def interrupt_report(err: BaseException) -> tuple[str, int]:
    """(one line, exit code) for an interrupted run: 143 for SIGTERM, 130 for Ctrl-C."""
    code = 128 + int(err.signum) if isinstance(err, Terminated) else 130
    progress = getattr(err, "qronos_progress", None)
    if progress is None:
        return "interrupted", code
    done, total, has_checkpoint = progress
    if has_checkpoint and done:
        return f"interrupted after wave {done} of {total}; rerun with --resume to continue", code
    if done:
        return f"interrupted after wave {done} of {total} (no checkpoint was written: --no-checkpoint)", code
    return f"interrupted before the first of {total} waves completed", code
