"""What a model expects as input, and the one check every calibration sample goes through before any work starts.

Every error names where the sample came from (``where``: a file, a file's sample, a list index), the offending key and
what the graph input expects, so that a user can fix the data without reading code.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..errors import CalibrationError, ModelError

Dim = int | str | None


@dataclass(frozen=True)
class InputSpec:
    """One real graph input. ``shape`` holds ints for fixed dims, a name (str) or None for symbolic ones; ``shape`` is
    None when the model does not declare the rank."""

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...] | None
    elem_type: str = ""  # the ONNX type name (FLOAT, INT64, ...), for messages

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    def describe(self) -> str:
        dims = "?" if self.shape is None else "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"
        return f"{dims} {self.dtype}"


def _dim(d) -> Dim:
    """One input dim: a fixed size, a symbolic name, or None. Paddle2ONNX writes -1 for the batch and the name "?"
    for every unknown dim; onnxruntime takes both as "any size", so here they are unnamed dynamic dims (otherwise two
    "?" dims would have to be equal)."""
    if isinstance(d, int):
        return d if d >= 0 else None
    return None if d.value in (None, "", "?") else d.value


def graph_input_specs(model: ir.Model) -> list[InputSpec]:
    """The inputs a feed must provide: graph inputs that are not initializers (those have a default value)."""
    initializers = set(model.graph.initializers)
    specs = []
    for value in model.graph.inputs:
        if value.name in initializers:
            continue
        if value.type is not None and not isinstance(value.type, ir.TensorType):
            raise ModelError(f"graph input {value.name!r} has type {value.type}; only tensor inputs are supported")
        if value.dtype is None or value.dtype == ir.DataType.UNDEFINED:
            raise ModelError(f"graph input {value.name!r} declares no element type; cannot check calibration data")
        try:
            dtype = np.dtype(value.dtype.numpy())
        except Exception:
            raise ModelError(f"graph input {value.name!r} has element type {value.dtype.name}, which numpy cannot "
                             f"hold; cannot feed it calibration data") from None
        shape = None
        if value.shape is not None:
            shape = tuple(_dim(d) for d in value.shape)
        specs.append(InputSpec(value.name, dtype, shape, value.dtype.name))
    if not specs:
        raise ModelError("the model has no graph inputs to feed (every input is an initializer)")
    return specs


def _names(keys) -> str:
    return ", ".join(repr(k) for k in keys) if keys else "none"


def check_keys(keys: Sequence[str], specs: Sequence[InputSpec], where: str) -> None:
    """Refuse missing graph inputs and keys that are not graph inputs."""
    wanted = [s.name for s in specs]
    missing = [n for n in wanted if n not in keys]
    if missing:
        raise CalibrationError(f"{where}: missing graph input(s) {_names(missing)}; the model needs "
                               f"{_names(wanted)}, found keys {_names(list(keys))}")
    extra = [k for k in keys if k not in wanted]
    if extra:
        raise CalibrationError(f"{where}: unexpected key(s) {_names(extra)} that are not graph inputs; the model needs "
                               f"exactly {_names(wanted)}")


def _is_float(dtype: np.dtype) -> bool:
    if dtype.kind in "fc":
        return True
    try:  # ml_dtypes (bfloat16, float8 ...) have kind 'V' but register finfo
        import ml_dtypes
        ml_dtypes.finfo(dtype)
        return True
    except Exception:
        return False


def _check_array(key: str, arr, spec: InputSpec, where: str) -> None:
    if not isinstance(arr, np.ndarray):
        raise CalibrationError(f"{where}: key {key!r} is a {type(arr).__module__}.{type(arr).__qualname__}, expected a "
                               f"numpy array {spec.describe()}")
    if spec.dtype.kind in "OUS":  # ONNX STRING: numpy str or bytes arrays
        ok = arr.dtype.kind in "US"
    else:
        ok = arr.dtype == spec.dtype
    if not ok:
        raise CalibrationError(f"{where}: key {key!r} has dtype {arr.dtype}, expected {spec.dtype} (graph input "
                               f"{spec.name!r} is {spec.elem_type or spec.dtype}); cast the data, it is not cast "
                               f"silently")
    if spec.shape is not None:
        if arr.ndim != len(spec.shape):
            raise CalibrationError(f"{where}: key {key!r} has shape {tuple(arr.shape)} ({arr.ndim} dims), expected "
                                   f"{len(spec.shape)} dims {spec.describe()}")
        for axis, (got, want) in enumerate(zip(arr.shape, spec.shape)):
            if isinstance(want, int) and got != want:
                raise CalibrationError(f"{where}: key {key!r} has shape {tuple(arr.shape)}: dim {axis} is {got}, "
                                       f"expected {want} (graph input shape {spec.describe()})")
    if _is_float(arr.dtype) and arr.size:
        finite = np.isfinite(arr)
        if not finite.all():
            n_nan = int(np.isnan(arr).sum())
            n_inf = int(arr.size - finite.sum()) - n_nan
            raise CalibrationError(f"{where}: key {key!r} has {n_nan} NaN and {n_inf} Inf value(s) out of {arr.size}; "
                                   f"calibration data must be finite")


def check_sample(sample, specs: Sequence[InputSpec], where: str) -> dict[str, np.ndarray]:
    """Validate one feed against the graph inputs; return it as a new dict in graph-input order (arrays untouched)."""
    if not isinstance(sample, Mapping):
        raise CalibrationError(f"{where}: is a {type(sample).__qualname__}, expected a dict of graph input name -> "
                               f"numpy array")
    check_keys(list(sample.keys()), specs, where)
    seen: dict[str, tuple[int, str]] = {}  # symbolic dim name -> (size, key that set it)
    for spec in specs:
        arr = sample[spec.name]
        _check_array(spec.name, arr, spec, where)
        for axis, dim in enumerate(spec.shape or ()):
            if isinstance(dim, str) and dim:
                size = int(arr.shape[axis])
                if dim in seen and seen[dim][0] != size:
                    other_size, other_key = seen[dim]
                    raise CalibrationError(f"{where}: symbolic dim {dim!r} is {other_size} in key {other_key!r} but "
                                           f"{size} in key {spec.name!r} (dim {axis}); the graph needs them equal")
                seen.setdefault(dim, (size, spec.name))
    return {spec.name: sample[spec.name] for spec in specs}
