"""Saving models: atomic writes, external data when needed, and refusal of outputs that would clobber inputs.

Why a temp *directory*: ``<name>.data`` is referenced by its relative name from inside the .onnx file, so both files
are written under their final names into a private folder next to the output and then renamed into place. A crash
or an error before the renames leaves any existing output untouched and no partial file under the final names.
The two renames (data first, then model) are the only window where the pair can disagree: a failed model rename
puts the old data file back; only a crash between the two renames can leave a new .data beside an old .onnx.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

from ..errors import ExportError
from .model import read_external, release

# protobuf cannot serialize a message over 2 GiB; stay clear of it with the graph's own bytes on top
EXTERNAL_DATA_THRESHOLD_BYTES = int(1.8e9)
PROTOBUF_LIMIT_BYTES = 2**31 - 1
EXTERNAL_SIZE_THRESHOLD = 1024  # tensors above this many bytes go to the .data file


def data_path_for(path: str | Path) -> Path:
    """The external data file written next to ``path``: ``<name>.data``."""
    path = Path(path)
    return path.with_name(path.name + ".data")


def _same_file(a: str | Path, b: str | Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def _writable_dir(path: Path) -> Path:
    """The nearest existing ancestor of ``path`` (the folder that will hold the output, or that we will create)."""
    d = path
    while not d.exists():
        if d.parent == d:
            break
        d = d.parent
    return d


def output_files(out: str | Path) -> dict[str, Path]:
    """Every file a run writes for output ``out``: the model, its external data and the two sidecars."""
    out = Path(out)
    return {"output model": out, "external data file": data_path_for(out),
            "config sidecar": out.with_name(out.name + ".config.yaml"),
            "report sidecar": out.with_name(out.name + ".report.json")}


def run_inputs(model_path: str | Path, model: ir.Model | None = None, calib=None,
               tokenizer: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
    """(role, path) of everything a run reads from disk: no output file may ever resolve to one of them."""
    inputs: list[tuple[str, Path]] = [("input model", Path(model_path))]
    if model is not None:
        inputs += [("external data of the input model", p) for p in sorted(external_sources(model))]
    for role, spec in (("calibration", calib), ("tokenizer", tokenizer)):
        if isinstance(spec, (str, os.PathLike)) and Path(spec).exists():
            path = Path(spec)
            if path.is_dir():
                inputs.append((f"{role} directory", path))
                inputs += [(f"{role} file", p) for p in sorted(path.iterdir()) if p.is_file()]
            else:
                inputs.append((f"{role} file", path))
    return inputs


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except OSError:
        return path.absolute()


def _collision(dst: Path, role: str, src: Path) -> str | None:
    """Why writing ``dst`` would destroy input ``src`` (None when it would not)."""
    if src.is_dir():
        if dst.exists() and _same_file(dst, src) or _resolved(dst) == _resolved(src):
            return f"is the {role} {str(src)!r}"
        if role == "calibration directory" and dst.suffix.lower() == ".npz" and not dst.exists() \
                and _resolved(dst).parent == _resolved(src):
            return f"would add a calibration file to the {role} {str(src)!r}"
        return None
    if (dst.exists() or dst.is_symlink()) and _same_file(dst, src) or _resolved(dst) == _resolved(src):
        return f"is the {role} {str(src)!r}"
    return None


def check_output_path(model_path: str | Path, out_path: str | Path, overwrite: bool,
                      inputs: list[tuple[str, Path]] | None = None) -> Path:
    """Refuse outputs that would overwrite an input, an existing file (unless ``overwrite``) or an unwritable folder.

    Every file the run writes (``output_files``) is checked against every input (``run_inputs``; the model alone when
    ``inputs`` is None) through symlinks, hard links and relative paths, whatever ``overwrite`` says. Returns the
    output path (absolute). Missing parent folders are accepted when they can be created.
    """
    model_path, out = Path(model_path), Path(out_path)
    if str(out_path) == "" or out.name in ("", ".", ".."):
        raise ExportError(f"output path {str(out_path)!r} is not a file name")
    if out.exists() and out.is_dir():
        raise ExportError(f"output path {str(out)!r} is a directory; give a file name such as model.q.onnx")
    if _same_file(out, model_path):
        raise ExportError(f"output path {str(out)!r} is the input model itself; choose a different output file")
    if _same_file(data_path_for(out), model_path):
        raise ExportError(f"output path {str(out)!r} would write its external data over the input model "
                          f"{str(model_path)!r}; choose a different output name")
    files = output_files(out)
    for kind, dst in files.items():
        for role, src in inputs if inputs is not None else [("input model", model_path)]:
            why = _collision(dst, role, src)
            if why:
                what = f"output path {str(out)!r}" if kind == "output model" else \
                    f"the {kind} {str(dst)!r} of output {str(out)!r}"
                raise ExportError(f"{what} {why}; inputs are never overwritten: choose a different output name")
    if not overwrite:
        for kind, dst in files.items():
            if dst.exists() or dst.is_symlink():
                if kind == "output model":
                    raise ExportError(f"output file {str(dst)!r} already exists; pass --overwrite (overwrite=True) "
                                      f"to replace it")
                raise ExportError(f"{kind} {str(dst)!r} of output {str(out)!r} already exists; pass --overwrite "
                                  f"(overwrite=True) to replace it")
    parent = out.absolute().parent
    base = _writable_dir(parent)
    if not base.is_dir():
        raise ExportError(f"cannot create output folder {str(parent)!r}: {str(base)!r} is not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ExportError(f"output folder {str(base)!r} is not writable; cannot write {str(out)!r}")
    return out.absolute()


def _initializer_values(model: ir.Model) -> list[ir.Value]:
    return [v for g in model.graphs() for v in g.initializers.values() if v.const_value is not None]


def model_tensor_bytes(model: ir.Model) -> int:
    """Bytes of all initializers (in memory or external): what an inline save would have to serialize."""
    return sum(int(v.const_value.nbytes) for v in _initializer_values(model))


def external_sources(model: ir.Model) -> set[Path]:
    """Files the model's lazy ExternalTensors read from (the *input* model's data files)."""
    out = set()
    for v in _initializer_values(model):
        t = v.const_value
        if isinstance(t, ir.ExternalTensor):
            out.add(Path(t.path))
    return out


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(model: ir.Model, path: Path, external: bool) -> None:
    """The actual serialization (separate so tests can make it fail midway)."""
    if external:
        ir.save(model, path, external_data=data_path_for(path).name, size_threshold_bytes=EXTERNAL_SIZE_THRESHOLD)
    else:
        save_streamed(model, path)


STREAM_MIN_BYTES = 64 << 10  # initializers this large are written one by one after the rest of the model


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _empty() -> ir.Tensor:
    return ir.Tensor(np.zeros(0, np.uint8))


def _streamable(t) -> bool:
    """Tensors written from their own bytes: not a parsed proto (may hold typed fields) nor strings."""
    if isinstance(t, ir.ExternalTensor):  # whatever its size: its bytes must land in the file, not a reference
        return True
    return (t is not None and not isinstance(t, (ir.serde.TensorProtoTensor, ir.StringTensor))
            and t.dtype != ir.DataType.STRING and t.nbytes >= STREAM_MIN_BYTES)


def save_streamed(model: ir.Model, path: str | Path) -> None:
    """One self-contained .onnx file, written tensor by tensor: the large initializers of the main graph are appended
    to the graph message one at a time (their bytes read, encoded or copied only when their turn comes), instead of
    serializing the whole model into one protobuf in memory first (two copies of every weight).

    The bytes are an ordinary ModelProto: protobuf parsers accept a message's fields in any order, so each tensor is
    written as its metadata followed by its ``raw_data`` field, and those tensors follow the graph's other fields.
    """
    path = Path(path)
    graph = model.graph
    streamed = [(v.name, v.const_value) for v in graph.initializers.values() if _streamable(v.const_value)]
    values = {name: graph.initializers[name] for name, _ in streamed}
    # subgraphs' external tensors (rare, small) are read into memory for the one serialization
    inner = [(v, v.const_value) for g in model.graphs() if g is not graph for v in g.initializers.values()
             if isinstance(v.const_value, ir.ExternalTensor)]
    try:
        for name, t in streamed:  # stand-ins with the same name, type and shape, and no data
            values[name].const_value = ir.LazyTensor(_empty, dtype=t.dtype, shape=t.shape, name=t.name,
                                                     doc_string=t.doc_string, metadata_props=dict(t.metadata_props))
        for v, t in inner:
            try:
                v.const_value = ir.Tensor(read_external(t), dtype=t.dtype, name=t.name, doc_string=t.doc_string)
            except Exception as err:
                raise ExportError(f"cannot read external data of tensor {v.name!r} from {t.path!r}: {err}") from None
        proto = ir.serde.serialize_model(model)
    finally:
        for name, t in streamed:
            values[name].const_value = t
        for v, t in inner:
            v.const_value = t
    names = {name for name, _ in streamed}
    metas = {}
    kept = []
    for tp in proto.graph.initializer:
        if tp.name in names:
            tp.ClearField("raw_data")
            metas[tp.name] = tp.SerializeToString()
        else:
            kept.append(tp)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    graph_bytes = proto.graph.SerializeToString()
    proto.ClearField("graph")
    heads = []
    for name, t in streamed:
        n = int(t.nbytes)
        body = metas[name] + b"\x4a" + _varint(n)  # TensorProto.raw_data = 9, length-delimited
        entry_len = len(body) + n
        heads.append((b"\x2a" + _varint(entry_len) + body, n))  # GraphProto.initializer = 5
    graph_len = len(graph_bytes) + sum(len(h) + n for h, n in heads)
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())
        f.write(b"\x3a" + _varint(graph_len) + graph_bytes)  # ModelProto.graph = 7
        for (name, t), (head, n) in zip(streamed, heads):
            f.write(head)
            f.flush()
            start = f.tell()
            try:
                t.tofile(f)
            except Exception as err:
                raise ExportError(f"cannot write tensor {name!r}: {type(err).__name__}: {err}") from None
            f.seek(0, os.SEEK_END)
            if f.tell() - start != n:
                raise ExportError(f"tensor {name!r} gave {f.tell() - start} bytes, its type and shape need {n}")
            release(t)


class OutputStage:
    """A private folder beside the output: the model, its data and its sidecars are written and checked there, and
    replace anything under their final names only in ``commit()``. Leaving the ``with`` block without a commit (an
    error, a failed validation, Ctrl-C) removes the folder and leaves every existing file as it was.
    """

    def __init__(self, path: str | Path, *, overwrite: bool = False):
        self.out = out = Path(path).absolute()
        self.overwrite = overwrite
        if out.exists() and out.is_dir():
            raise ExportError(f"output path {str(out)!r} is a directory; give a file name such as model.q.onnx")
        if out.exists() and not overwrite:
            raise ExportError(f"output file {str(out)!r} already exists; pass --overwrite (overwrite=True) to "
                              f"replace it")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            self.dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        except OSError as err:
            raise ExportError(f"cannot write into output folder {str(out.parent)!r}: {err.strerror or err}") from None
        self.model_path = self.dir / out.name  # same name as the output: relative external-data references hold
        self._has_model = self._has_data = False
        self._sources: set[Path] = set()
        self._texts: list[Path] = []

    def __enter__(self) -> "OutputStage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def write_model(self, model: ir.Model, external_data: bool | None = None) -> Path:
        """Serialize ``model`` into the stage; returns the staged path (validate it there before ``commit``)."""
        out, data = self.out, data_path_for(self.out)
        self._sources = sources = external_sources(model)
        for src in sources:
            for dst in (out, data):
                if _same_file(src, dst):
                    raise ExportError(f"cannot write {str(dst)!r}: the model being saved still reads its external "
                                      f"data from that file; choose a different output path")
        nbytes = model_tensor_bytes(model)
        external = external_data if external_data is not None else nbytes > EXTERNAL_DATA_THRESHOLD_BYTES
        if not external and nbytes > PROTOBUF_LIMIT_BYTES:
            raise ExportError(f"model for {str(out)!r} holds {nbytes / 2**30:.2f} GiB of tensors, over the 2 GiB "
                              f"protobuf limit; save it with external data")
        if external and data.exists() and not self.overwrite:
            raise ExportError(f"external data file {str(data)!r} already exists; pass --overwrite (overwrite=True) "
                              f"to replace it")
        tmp_data = data_path_for(self.model_path)
        try:
            _write(model, self.model_path, external)
        except ExportError:
            raise
        except Exception as err:
            raise ExportError(f"failed to write {str(out)!r}: {type(err).__name__}: {err}") from None
        try:
            self._has_data = external and tmp_data.exists()  # False when every tensor stayed under the threshold
            if self._has_data:
                _fsync(tmp_data)
            _fsync(self.model_path)
        except OSError as err:
            raise ExportError(f"failed to write {str(out)!r}: {err}") from None
        self._has_model = True
        return self.model_path

    def write_text(self, dst: str | Path, text: str) -> None:
        """A sidecar file (beside the output) that is committed with the model."""
        dst = Path(dst).absolute()
        if dst.parent != self.out.parent:
            raise ValueError(f"sidecar {dst} is not in the output folder {self.out.parent}")
        if dst.exists() and not self.overwrite:
            raise ExportError(f"{str(dst)!r} already exists; pass --overwrite (overwrite=True) to replace it")
        try:
            tmp = self.dir / dst.name
            tmp.write_text(text)
            _fsync(tmp)
        except OSError as err:
            raise ExportError(f"failed to write {str(dst)!r}: {err}") from None
        self._texts.append(dst)

    def commit(self) -> Path:
        """Move everything into place: data, then model (the old data is put back if the model rename fails), then
        the sidecars."""
        if not self._has_model:
            raise RuntimeError("OutputStage.commit() before write_model()")
        out, data, tmp_data = self.out, data_path_for(self.out), data_path_for(self.model_path)
        try:
            backup = None
            if self._has_data and data.exists():  # keep the old data reachable until the new model is in place
                backup = self.dir / ".previous.data"
                try:
                    os.link(data, backup)
                except OSError:
                    backup = None
            if self._has_data:
                os.replace(tmp_data, data)
            try:
                os.replace(self.model_path, out)
            except OSError:
                if backup is not None:
                    os.replace(backup, data)  # the old model must keep finding its old data
                raise
            if not self._has_data and self.overwrite and data.exists() \
                    and not any(_same_file(s, data) for s in self._sources):
                data.unlink()  # the data file of the output we just replaced: it belongs to nothing any more
            for dst in self._texts:
                os.replace(self.dir / dst.name, dst)
        except OSError as err:
            raise ExportError(f"failed to write {str(out)!r}: {err}") from None
        return out


def save_model(model: ir.Model, path: str | Path, *, external_data: bool | None = None,
               overwrite: bool = False) -> Path:
    """Write ``model`` to ``path`` atomically; returns the absolute path written.

    ``external_data``: None chooses automatically (external when the tensors exceed ~1.8 GB), True forces
    ``<name>.data`` next to the file (single file, tensors over 1 KiB), False forces one self-contained file.
    The model object is left unchanged; lazy tensors of the input model are read from their input location.
    """
    with OutputStage(path, overwrite=overwrite) as stage:
        stage.write_model(model, external_data)
        return stage.commit()
