"""onnxruntime-genai model folders in and out: ``quantize GENAI_DIR --calib text.txt -o OUT_DIR``.

A genai folder (what ``onnxruntime_genai.models.builder`` writes) holds ``genai_config.json``, the decoder ONNX file it
names (``model.decoder.filename``) with its external data, and the tokenizer files. This module

- opens such a folder: the decoder file, the tokenizer (the folder itself) and the values of the cache dims the graph
  leaves symbolic (the builder declares the head size as ``kv_cache_dim``; genai reads it from the config, and so does
  the prefill pass of text calibration and ``eval --task ppl`` here);
- quantizes its decoder with ``api.quantize()`` into a staging folder ``OUT_DIR.qronos-partial`` beside the target,
  copies every other file of the input folder (config, tokenizer, other models), rewrites ``genai_config.json`` with
  the new decoder file name, checks that onnxruntime-genai loads the result (when it is installed and the folder
  targets the CPU) and only then renames the staging folder into place. The input folder is only read; an existing
  ``OUT_DIR`` is replaced only with ``overwrite`` (and only when it is a genai folder or empty).

MatMulNBits is the default dialect for genai folders: it is what genai's own int4 models use.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import QuantConfig
from .errors import ExportError, ModelError

if TYPE_CHECKING:
    from .api import QuantResult

CONFIG_NAME = "genai_config.json"
STAGING_SUFFIX = ".qronos-partial"  # OUT_DIR.qronos-partial: the folder being built (kept with a checkpoint)
_OLD_SUFFIX = ".qronos-old"


@dataclass(frozen=True)
class GenaiFolder:
    """An onnxruntime-genai model folder, read-only: its config and the decoder model it names."""

    dir: Path
    config: dict[str, Any]
    model_file: Path  # the decoder ONNX file (model.decoder.filename)

    @property
    def tokenizer(self) -> Path:
        """genai reads the tokenizer from the model folder; so does calibration."""
        return self.dir

    @property
    def decoder(self) -> dict[str, Any]:
        return self.config["model"]["decoder"]

    @property
    def providers(self) -> list[str]:
        """The execution providers genai_config.json asks for, in its order; none means the CPU."""
        options = self.decoder.get("session_options", {}).get("provider_options") or []
        return [str(name).lower() for entry in options if isinstance(entry, dict) for name in entry]

    def decoder_files(self) -> set[Path]:
        """The decoder file and the external data files it references: what the quantized decoder replaces."""
        import onnx

        files = {self.model_file}
        try:
            proto = onnx.load(str(self.model_file), load_external_data=False)
        except Exception as err:  # noqa: BLE001 - protobuf/onnx errors all mean "not a readable model"
            raise ModelError(f"decoder {str(self.model_file)!r} of genai folder {str(self.dir)!r} is not a readable "
                             f"ONNX model ({_first_line(err)})") from None
        for tensor in _all_tensors(proto.graph):
            for entry in tensor.external_data:
                if entry.key == "location":
                    files.add(self.model_file.parent / entry.value)
        return files


def _all_tensors(graph) -> Iterator:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for g in attr.graphs:
                yield from _all_tensors(g)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def is_genai_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / CONFIG_NAME).is_file()


def open_folder(path: str | os.PathLike) -> GenaiFolder:
    """The genai folder at ``path``, with one-line errors for a folder that is not one."""
    d = Path(path)
    if not d.is_dir():
        raise ModelError(f"{str(d)!r} is not a folder")
    cfg_path = d / CONFIG_NAME
    if not cfg_path.is_file():
        raise ModelError(f"folder {str(d)!r} has no {CONFIG_NAME}; give an ONNX model file or an onnxruntime-genai "
                         f"model folder")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ModelError(f"cannot read {str(cfg_path)!r}: {err}") from None
    except json.JSONDecodeError as err:
        raise ModelError(f"{str(cfg_path)!r}:{err.lineno}:{err.colno}: not valid JSON: {err.msg}") from None
    decoder = config.get("model", {}).get("decoder") if isinstance(config, dict) and \
        isinstance(config.get("model"), dict) else None
    name = decoder.get("filename") if isinstance(decoder, dict) else None
    if not isinstance(name, str) or not name:
        raise ModelError(f"{str(cfg_path)!r} has no model.decoder.filename (a string naming the decoder ONNX file)")
    model_file = d / name
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise ModelError(f"{str(cfg_path)!r}: model.decoder.filename {name!r} must be a file inside the folder")
    if not model_file.is_file():
        raise ModelError(f"{str(cfg_path)!r} names decoder {name!r}, but {str(model_file)!r} does not exist")
    return GenaiFolder(d, config, model_file)


def resolve_model(path: str | os.PathLike) -> str:
    """A model argument as an ONNX file: a genai folder gives its decoder file (its tokenizer is in the same folder,
    where ``eval`` looks by default); a file stays as it is."""
    if Path(path).is_dir():
        return str(open_folder(path).model_file)
    return str(path)


def _decoder_config(model_file: Path) -> dict[str, Any] | None:
    """``model.decoder`` of the genai_config.json that names ``model_file`` as its decoder (in its folder or up to two
    folders above), or None."""
    try:
        target = model_file.resolve()
    except OSError:
        return None
    for d in list(target.parents)[:3]:
        cfg_path = d / CONFIG_NAME
        if not cfg_path.is_file():
            continue
        try:
            decoder = json.loads(cfg_path.read_text(encoding="utf-8"))["model"]["decoder"]
            if (d / decoder["filename"]).resolve() == target:
                return decoder
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def kv_dims(model_file: str | os.PathLike) -> dict[str, int]:
    """Values for the symbolic KV-cache dims of a genai decoder, from the genai_config.json that names it: axis 1 of a
    [batch, heads, past, head_size] past input is ``num_key_value_heads``, axis 3 ``head_size``. Empty for any other
    ONNX file."""
    model_file = Path(model_file)
    decoder = _decoder_config(model_file) if model_file.is_file() else None
    if decoder is None:
        return {}
    values = {1: decoder.get("num_key_value_heads"), 3: decoder.get("head_size")}
    import onnx

    try:
        graph = onnx.load(str(model_file), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - the caller's own load says what is wrong with the file
        return {}
    dims: dict[str, int] = {}
    for inp in graph.input:
        shape = inp.type.tensor_type.shape.dim
        if "past" not in inp.name or len(shape) != 4:
            continue
        for axis, value in values.items():
            if isinstance(value, int) and value > 0 and shape[axis].dim_param:
                dims[shape[axis].dim_param] = value
    return dims


@contextlib.contextmanager
def cache_dims(model_file: str | os.PathLike) -> Iterator[None]:
    """Text calibration / ppl / inspect of a genai decoder: its cache dims from genai_config.json (else nothing)."""
    from .calib.kv_cache import known_dims

    with known_dims(kv_dims(model_file)):
        yield


# ------------------------------------------------------------------------------------------------ output folder

def _inside(a: Path, b: Path) -> bool:
    """``a`` is ``b`` or lies under it (resolved paths)."""
    return a == b or b in a.parents


def _resolved(p: str | os.PathLike) -> Path:
    return Path(p).expanduser().absolute().resolve()


def check_output_folder(src: GenaiFolder, out: str | os.PathLike, overwrite: bool,
                        others: list[tuple[str, str | os.PathLike | None]] = ()) -> Path:
    """Refuse, before any work, an output folder that would write into or over an input, or over an existing folder
    without ``overwrite``. ``others``: further inputs (calibration, tokenizer) as (role, path). Returns it absolute."""
    if str(out) == "" or Path(out).name in ("", ".", ".."):
        raise ExportError(f"output {str(out)!r} is not a folder name")
    target = Path(out).expanduser().absolute()
    rin, rout = _resolved(src.dir), _resolved(target)
    if rout == rin:
        raise ExportError(f"output folder {str(target)!r} is the input genai folder; inputs are never overwritten: "
                          f"choose a different output folder")
    if _inside(rout, rin):
        raise ExportError(f"output folder {str(target)!r} is inside the input genai folder {str(src.dir)!r}; the "
                          f"input folder is never written into: choose a folder outside it")
    if _inside(rin, rout):
        raise ExportError(f"output folder {str(target)!r} contains the input genai folder {str(src.dir)!r}; choose a "
                          f"different output folder")
    for role, path in others:
        if path is not None and Path(path).exists() and _inside(_resolved(path), rout):
            raise ExportError(f"output folder {str(target)!r} contains the {role} {str(path)!r}; replacing it would "
                              f"delete an input: choose a different output folder")
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise ExportError(f"output {str(target)!r} exists and is not a folder; a genai folder is written as a "
                              f"folder: choose a folder name")
        if not overwrite:
            raise ExportError(f"output folder {str(target)!r} already exists; pass --overwrite (overwrite=True) to "
                              f"replace it")
        if any(target.iterdir()) and not (target / CONFIG_NAME).is_file():
            raise ExportError(f"output folder {str(target)!r} is not empty and is not a genai folder (no "
                              f"{CONFIG_NAME}); --overwrite only replaces a genai folder: choose another name")
    base = target.parent
    while not base.exists() and base.parent != base:
        base = base.parent
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise ExportError(f"output folder {str(target.parent)!r} is not writable; cannot write {str(target)!r}")
    return target


def staging_dir(out: str | os.PathLike) -> Path:
    """``OUT_DIR.qronos-partial``: the folder built before the rename, fixed so that ``--resume`` finds the
    checkpoint of an interrupted run inside it."""
    out = Path(out).absolute()
    return out.with_name(out.name + STAGING_SUFFIX)


def default_dialect(config: QuantConfig, dialect_given: bool) -> QuantConfig:
    """A genai folder's default export dialect is MatMulNBits (genai's own int4 format) unless one was asked for;
    activation quantization keeps its QDQ form."""
    if dialect_given or config.export.dialect != "qdq" or config.activations.enabled:
        return config
    return config.override({"export.dialect": "matmulnbits"})


FAST_ACCURACY_PROVIDERS = ("cpu", "webgpu")  # where genai's model builder writes MatMulNBits accuracy_level 4


def default_accuracy_level(config: QuantConfig, folder: GenaiFolder) -> QuantConfig:
    """An unset ``export.accuracy_level`` becomes what genai's model builder writes for the folder's execution
    provider: 4 (int8 activations inside MatMulNBits, the fast CPU kernels) on the CPU and WebGPU, 0 elsewhere. A
    deployment user gets the decode speed of the builder's own int4 folder; ``--accuracy-level 0`` keeps float
    math."""
    if config.export.accuracy_level is not None:
        return config
    provider = (folder.providers or ["cpu"])[0]
    return config.override({"export.accuracy_level": 4 if provider in FAST_ACCURACY_PROVIDERS else 0})


def quantize_folder(model_dir: str | os.PathLike, calib: Any, output_dir: str | os.PathLike,
                    config: QuantConfig | None = None, *, tokenizer: str | os.PathLike | None = None,
                    overwrite: bool = False, quiet: bool = False, resume: bool = False, checkpoint: bool = True,
                    check_load: bool = True) -> QuantResult:
    """Quantize the decoder of genai folder ``model_dir`` and write a genai folder ``output_dir``.

    ``config`` is used as given (``default_dialect`` gives the CLI's MatMulNBits default), but for an unset
    ``export.accuracy_level`` (``default_accuracy_level``). ``tokenizer``: default the folder's own. Returns
    ``api.quantize()``'s result with the final paths; the decoder's ``.config.yaml`` and ``.report.json`` sidecars are
    inside the output folder.
    """
    from .api import quantize
    from .checkpoint import checkpoint_dir

    src = open_folder(model_dir)
    config = default_accuracy_level(config or QuantConfig(), src)
    tok = Path(tokenizer) if tokenizer is not None else src.tokenizer
    calib_path = calib if isinstance(calib, (str, os.PathLike)) else None
    out = check_output_folder(src, output_dir, overwrite, [("calibration data", calib_path), ("tokenizer", tok)])
    stage = staging_dir(out)
    if stage.exists() and not resume:
        shutil.rmtree(stage)  # a failed or interrupted earlier run's: this run starts over
    name = src.decoder["filename"]  # the quantized decoder keeps the name (and subfolder) genai_config.json gives
    staged_model = stage / name
    ok = False
    try:
        staged_model.parent.mkdir(parents=True, exist_ok=True)
        with cache_dims(src.model_file):
            result = quantize(src.model_file, calib, staged_model, config, tokenizer=str(tok), overwrite=False,
                              quiet=quiet, resume=resume, checkpoint=checkpoint)
        say(f"copying the rest of {src.dir.name}/ (config, tokenizer) and writing {CONFIG_NAME}", quiet)
        _copy_rest(src, stage)
        _write_config(src, stage, name)
        final_model = out / name
        _fix_report(result.report_path, final_model)
        if check_load:
            say("checking that onnxruntime-genai loads the new folder", quiet)
            _check_genai_load(stage, src)
        _move_into_place(stage, out, overwrite)
        ok = True
    finally:
        if not ok and stage.exists() and not checkpoint_dir(staged_model).exists():
            shutil.rmtree(stage, ignore_errors=True)  # nothing worth keeping; a checkpoint stays for --resume
    return dataclasses.replace(result, output_path=final_model, config_path=final_model.with_name(
        result.config_path.name), report_path=final_model.with_name(result.report_path.name))


def _copy_rest(src: GenaiFolder, stage: Path) -> None:
    """Every file of the input folder (subfolders too) except the float decoder, its data and the config (rewritten);
    what quantize wrote stays."""
    skip = {p.resolve() for p in src.decoder_files()} | {(src.dir / CONFIG_NAME).resolve()}
    for entry in sorted(src.dir.rglob("*")):
        dst = stage / entry.relative_to(src.dir)
        if entry.is_dir() or entry.resolve() in skip or dst.exists():
            continue
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(entry, dst)
        except OSError as err:
            raise ExportError(f"cannot copy {str(entry)!r} into the output folder: {err.strerror or err}") from None


def _write_config(src: GenaiFolder, stage: Path, model_name: str) -> None:
    config = json.loads(json.dumps(src.config))  # a deep copy
    config["model"]["decoder"]["filename"] = model_name
    (stage / CONFIG_NAME).write_text(json.dumps(config, indent=4), encoding="utf-8")


def _fix_report(report_path: Path, final_model: Path) -> None:
    """The report names the staged file; make it name the file where it will live."""
    try:
        data = json.loads(report_path.read_text())
        data["output"] = str(final_model)
        report_path.write_text(json.dumps(data, indent=2))
    except (OSError, ValueError):
        pass  # the report is informative; the model is what matters


def _check_genai_load(stage: Path, src: GenaiFolder) -> None:
    """onnxruntime-genai loads the folder and its tokenizer (skipped when genai is not installed or the folder is built
    for another execution provider than the CPU)."""
    if src.providers:
        return
    try:
        import onnxruntime_genai as og
    except ImportError:
        return
    try:
        model = og.Model(str(stage))
        og.Tokenizer(model)
    except Exception as err:  # noqa: BLE001 - genai raises plain RuntimeErrors
        raise ExportError(f"onnxruntime-genai cannot load the quantized folder: {_first_line(err)}") from None
    del model


def _move_into_place(stage: Path, out: Path, overwrite: bool) -> None:
    """Rename the staging folder to ``out``; an existing ``out`` (allowed by ``overwrite``) is moved aside first and
    put back if the rename fails."""
    old = None
    try:
        if out.exists():
            if not overwrite:
                raise ExportError(f"output folder {str(out)!r} appeared during the run; pass --overwrite to replace it")
            old = out.with_name(out.name + _OLD_SUFFIX)
            if old.exists():
                shutil.rmtree(old)
            os.replace(out, old)
        try:
            os.replace(stage, out)
        except OSError:
            if old is not None:
                os.replace(old, out)
                old = None
            raise
    except OSError as err:
        raise ExportError(f"cannot move the new folder into place at {str(out)!r}: {err.strerror or err}") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"qronos-onnx: {msg}", file=sys.stderr, flush=True)
