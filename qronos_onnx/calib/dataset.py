"""CalibrationSet: the feeds the capture runs through onnxruntime, validated against the graph inputs up front.

Sources (``load_calibration``):
- a directory of ``.npz`` files, read in sorted file-name order (other files are ignored; a directory with no .npz is
  refused), or one ``.npz`` file. Keys are graph input names. A file holds several samples, split along axis 0, when
  every array has one more dim than its graph input (stacked samples), or when arrays have the graph input's rank but
  a leading dim that is a multiple (> 1x) of the model's fixed batch dim (chunks of that batch); otherwise the file is
  one sample, except that when ``samples`` asks for fewer samples than the rows of a file holding one batch along a
  dynamic axis 0 (512 images as one array), its first ``samples`` rows are taken as samples. Loaded with ``allow_pickle=False``: object arrays are refused, never unpickled.
- an onnxruntime ``CalibrationDataReader``-like object (``get_next()`` returning a dict, then None), or a list of
  dicts; arrays are kept as given, behind read-only views, never copied or modified.
- a ``.txt`` / ``.jsonl`` text file plus ``tokenizer`` (see ``text.py`` for the window rule).
``samples`` keeps the first N samples in that order (npz: after sorting files, in file order then axis-0 order; reader:
the first N ``get_next()`` results, it is not called again); for text it is the number of random windows.

Every sample is checked before anything runs: keys, dtypes, ranks, fixed dims, equal sizes for equal symbolic dim
names, finite float data. npz sets whose arrays exceed ``IN_MEMORY_BYTES`` are not kept in memory: the files are read
once to validate, then again on access (one file cached), and a file changed in between is refused.
"""
from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from ..errors import CalibrationError, ConfigError
from .specs import InputSpec, check_keys, check_sample, graph_input_specs
from .text import TEXT_SUFFIXES, text_samples

log = logging.getLogger(__name__)

IN_MEMORY_BYTES = 1 << 30  # above this, npz samples are re-read from disk on access instead of kept


class CalibrationSet(Sequence):
    """An ordered, validated sequence of ORT feeds (``dict`` input name -> array), with a description of its source."""

    def __init__(self, samples: Sequence[dict[str, np.ndarray]], source: str,
                 specs: Sequence[InputSpec] = (), n_tokens: int | None = None):
        self.samples = samples
        self.source = source
        self.specs = list(specs)
        self.n_tokens = n_tokens  # tokens in the samples' input_ids, when the model takes input_ids

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):
        if isinstance(index, slice):
            r = range(*index.indices(len(self)))
            picked = [self.samples[i] for i in r]
            step = f":{r.step}" if r.step != 1 else ""
            return CalibrationSet(picked, f"{self.source}, samples [{r.start}:{r.stop}{step}]", self.specs,
                                  _count_tokens(picked))
        return self.samples[index]

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.specs]

    def reader(self) -> "_Reader":
        """An onnxruntime CalibrationDataReader over this set (``get_next`` / ``rewind``)."""
        return _Reader(self)

    def __repr__(self) -> str:
        return f"CalibrationSet({len(self)} samples from {self.source})"


class _Reader:
    def __init__(self, calib: CalibrationSet):
        self._calib, self._i = calib, 0

    def get_next(self):
        if self._i >= len(self._calib):
            return None
        self._i += 1
        return self._calib[self._i - 1]

    def rewind(self) -> None:
        self._i = 0


def load_calibration(source, model: ir.Model, *, samples: int | None = None, seed: int = 0, seq_len: int = 256,
                     tokenizer: str | os.PathLike | None = None, special_tokens: bool = False) -> CalibrationSet:
    """Build and validate the calibration feeds for ``model`` from ``source`` (see the module docstring)."""
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise ConfigError(f"samples must be a positive integer or None, got {samples!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError(f"seq_len must be a positive integer, got {seq_len!r}")
    specs = graph_input_specs(model)
    origin = None
    if isinstance(source, CalibrationSet):
        source, origin = source.samples, source.source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise CalibrationError(f"calibration source {str(path)!r} does not exist")
        if path.suffix.lower() in TEXT_SUFFIXES and path.is_file():
            feeds, desc, _ = text_samples(path, model, specs, tokenizer, samples, seed, seq_len, special_tokens)
            return CalibrationSet(feeds, desc, specs, _count_tokens(feeds))
        if tokenizer is not None:
            log.warning("tokenizer %r is ignored: calibration source %r is not a text file", str(tokenizer), str(path))
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".npz" and p.is_file())
            if not files:
                others = sorted(p.name for p in path.iterdir())
                shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
                raise CalibrationError(f"calibration directory {str(path)!r} holds no .npz file (found "
                                       f"{len(others)} other entries{': ' + shown if others else ''}); expected .npz "
                                       f"files keyed by graph input names")
            return _load_npz(files, specs, samples, f"{len(files)} .npz file(s) in {str(path)!r}")
        if path.suffix.lower() == ".npz":
            return _load_npz([path], specs, samples, f".npz file {str(path)!r}")
        raise CalibrationError(f"calibration file {str(path)!r} has an unsupported type; expected a directory of .npz "
                               f"files, a .npz file, or a {'/'.join(TEXT_SUFFIXES)} text file with a tokenizer")
    if hasattr(source, "get_next") and callable(source.get_next):
        return _load_reader(source, specs, samples)
    if isinstance(source, (list, tuple)) or (isinstance(source, Sequence) and not isinstance(source, (str, bytes))):
        if not len(source):
            raise CalibrationError("the calibration list is empty; expected at least one dict of input name -> array")
        picked = list(itertools.islice(source, samples))
        feeds = [_as_given(check_sample(s, specs, f"calibration list item {i}")) for i, s in enumerate(picked)]
        desc = origin if origin is not None else f"list of {len(feeds)} sample(s)"
        return CalibrationSet(feeds, desc, specs, _count_tokens(feeds))
    if isinstance(source, Mapping):
        raise CalibrationError("the calibration source is a single dict; wrap one sample in a list ([feed]) or give "
                               "a list of dicts of input name -> array")
    raise CalibrationError(f"calibration source of type {type(source).__qualname__} is not supported; expected a "
                           f"directory of .npz files, a .npz file, a .txt/.jsonl text file with a tokenizer, a list of "
                           f"dicts, or an object with get_next()")


def _as_given(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Read-only views of the caller's arrays: nothing downstream can write into them."""
    out = {}
    for name, arr in feed.items():
        view = arr.view()
        view.flags.writeable = False
        out[name] = view
    return out


def _load_reader(reader, specs: Sequence[InputSpec], samples: int | None) -> CalibrationSet:
    feeds = []
    while samples is None or len(feeds) < samples:
        item = reader.get_next()
        if item is None:
            break
        where = f"calibration reader sample {len(feeds)} (get_next() call {len(feeds) + 1})"
        feeds.append(_as_given(check_sample(item, specs, where)))
    if not feeds:
        raise CalibrationError("the calibration reader's first get_next() returned None: no samples")
    return CalibrationSet(feeds, f"{type(reader).__qualname__} reader, {len(feeds)} sample(s)", specs,
                          _count_tokens(feeds))


def _count_tokens(feeds) -> int | None:
    if not feeds or "input_ids" not in feeds[0]:
        return None
    return int(sum(f["input_ids"].size for f in feeds))


# --- npz ------------------------------------------------------------------------------------------------------------

def read_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of one .npz, loaded without pickle; a clear error for anything that is not a plain npz archive."""
    where = f"file {str(path)!r}"
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as err:
        raise CalibrationError(f"cannot read {where}: {err.strerror or err}") from None
    if magic == b"\x93NUMPY":
        raise CalibrationError(f"{where} holds a single .npy array, expected an .npz archive keyed by graph input "
                               f"names (np.savez(path, **feed))")
    if not magic.startswith(b"PK"):
        what = "pickled data, which is never loaded" if magic[:1] == b"\x80" else "not a zip archive"
        raise CalibrationError(f"{where} is not a readable .npz archive ({what}); expected np.savez output")
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as err:
        raise CalibrationError(f"{where} is not a readable .npz archive ({_first_line(err)})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        loaded_type = type(loaded).__name__
        raise CalibrationError(f"{where} is not an .npz archive (numpy read a {loaded_type}); expected np.savez output")
    arrays = {}
    with loaded:
        for key in loaded.files:
            try:
                arrays[key] = loaded[key]
            except ValueError as err:
                if "allow_pickle" in str(err):
                    raise CalibrationError(f"{where}: key {key!r} is an object (pickled) array, which is never "
                                           f"loaded; expected a plain numeric array") from None
                raise CalibrationError(f"{where}: key {key!r} cannot be read ({_first_line(err)})") from None
            except Exception as err:
                raise CalibrationError(f"{where}: key {key!r} cannot be read ({_first_line(err)}); is the file "
                                       f"truncated or corrupt?") from None
    if not arrays:
        raise CalibrationError(f"{where} holds no arrays; expected one array per graph input")
    return arrays


def split_npz(path: Path, arrays: dict[str, np.ndarray], specs: Sequence[InputSpec],
              limit: int | None = None) -> list[dict[str, np.ndarray]]:
    """The first ``limit`` samples of one file (see the module docstring for when it is split along axis 0),
    validated; the keys and the split are checked for the whole file."""
    where = f"file {str(path)!r}"
    check_keys(list(arrays), specs, where)
    by_name = {s.name: s for s in specs}
    plans: dict[str, tuple[str, int, int]] = {}  # key -> (mode, count, chunk)
    for key, arr in arrays.items():
        spec = by_name[key]
        if spec.rank is None:
            continue
        if arr.ndim == spec.rank + 1:
            plans[key] = ("stacked", arr.shape[0], 1)
        elif arr.ndim == spec.rank and arr.ndim and isinstance(spec.shape[0], int) and spec.shape[0] > 0:
            b, n = spec.shape[0], arr.shape[0]
            if n > b and n % b == 0:
                plans[key] = ("batched", n // b, b)
    if not plans and limit is not None:
        rows = _dynamic_batch_rows(arrays, by_name)
        if rows is not None and rows > limit:  # one batch of many rows, fewer samples asked: take rows, not files
            plans = {key: ("batched", rows, 1) for key in arrays}
    if not plans:
        return [check_sample(arrays, specs, where)]
    counts = {key: plan[1] for key, plan in plans.items()}
    unsplit = [k for k in arrays if k not in plans]
    first = next(iter(plans))
    if unsplit or len(set(counts.values())) > 1:
        odd = unsplit[0] if unsplit else next(k for k in plans if counts[k] != counts[first])
        what = "a single sample" if odd in unsplit else f"{counts[odd]} samples along axis 0"
        raise CalibrationError(f"{where}: key {first!r} holds {counts[first]} samples along axis 0 "
                               f"({_plan_text(plans[first], by_name[first])}) but key {odd!r} holds {what} (shape "
                               f"{tuple(arrays[odd].shape)}, graph input {by_name[odd].describe()}); split every key "
                               f"into the same number of samples, or none")
    n = counts[first]
    if n == 0:
        raise CalibrationError(f"{where}: key {first!r} has shape {tuple(arrays[first].shape)}, which stacks 0 samples")
    samples = []
    for i in range(n if limit is None else min(n, limit)):
        sample = {}
        for key, arr in arrays.items():
            mode, _, chunk = plans[key]
            sample[key] = arr[i] if mode == "stacked" else arr[i * chunk:(i + 1) * chunk]
        samples.append(check_sample(sample, specs, f"{where} sample {i}"))
    return samples


def _dynamic_batch_rows(arrays: dict[str, np.ndarray], by_name: dict[str, InputSpec]) -> int | None:
    """The common leading size when every key is one batch along a symbolic (dynamic) axis 0, else None."""
    sizes = set()
    for key, arr in arrays.items():
        spec = by_name[key]
        if spec.rank is None or arr.ndim != spec.rank or arr.ndim == 0 or isinstance(spec.shape[0], int):
            return None
        sizes.add(arr.shape[0])
    return sizes.pop() if len(sizes) == 1 else None


def _plan_text(plan: tuple[str, int, int], spec: InputSpec) -> str:
    mode, _, chunk = plan
    if mode == "stacked":
        return f"one more dim than graph input {spec.describe()}"
    return f"chunks of the fixed batch {chunk} of graph input {spec.describe()}"


def _load_npz(files: list[Path], specs: Sequence[InputSpec], limit: int | None, desc: str) -> CalibrationSet:
    entries: list[tuple[Path, int]] = []
    kept: list[dict[str, np.ndarray]] | None = []
    stats: dict[Path, tuple[int, int]] = {}
    limits: dict[Path, int | None] = {}  # the sample limit each file was split with (lazy re-reads split alike)
    total_bytes, n_tokens = 0, 0
    for path in files:
        if limit is not None and len(entries) >= limit:
            break
        stats[path] = _stat(path)
        file_samples = split_npz(path, read_npz(path), specs, None if limit is None else limit - len(entries))
        entries += [(path, i) for i in range(len(file_samples))]
        limits[path] = None if limit is None else limit - (len(entries) - len(file_samples))
        total_bytes += sum(a.nbytes for s in file_samples for a in s.values())
        n_tokens += sum(s["input_ids"].size for s in file_samples if "input_ids" in s)
        if kept is not None:
            if total_bytes > IN_MEMORY_BYTES:
                kept = None
            else:
                kept += file_samples
    if not entries:
        raise CalibrationError(f"calibration source ({desc}) holds no samples")
    used = len({p for p, _ in entries})
    desc = f"{desc}, {len(entries)} sample(s)" + (f" from the first {used} file(s)" if used < len(files) else "")
    samples: Sequence[dict[str, np.ndarray]] = kept if kept is not None else _LazyNpzSamples(entries, specs, stats, limits)
    has_ids = any(s.name == "input_ids" for s in specs)
    return CalibrationSet(samples, desc, specs, int(n_tokens) if has_ids else None)


class _LazyNpzSamples(Sequence):
    """npz samples re-read on access (one file cached), for sets too large to keep in memory."""

    def __init__(self, entries: list[tuple[Path, int]], specs: Sequence[InputSpec],
                 stats: dict[Path, tuple[int, int]], limits: dict[Path, int | None]):
        self._entries, self._specs, self._stats, self._limits = entries, list(specs), stats, limits
        self._path: Path | None = None
        self._cached: list[dict[str, np.ndarray]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        path, i = self._entries[index]
        if path != self._path:
            if _stat(path) != self._stats[path]:
                raise CalibrationError(f"calibration file {str(path)!r} changed after it was validated; reload the "
                                       f"calibration set")
            self._cached, self._path = split_npz(path, read_npz(path), self._specs,
                                                 self._limits.get(path)), path
        return self._cached[i]


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError as err:
        raise CalibrationError(f"cannot read calibration file {str(path)!r}: {err.strerror or err}") from None
    return st.st_size, st.st_mtime_ns


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
