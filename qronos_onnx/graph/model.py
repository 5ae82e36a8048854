"""Loading ONNX models for quantization: lazily (external data stays on disk), with errors a user can act on."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from ..errors import ModelError


def load_model(path: str | Path) -> ir.Model:
    """Load ``path`` with onnx-ir. Initializers in external data are read only when touched."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model file {str(path)!r} does not exist")
    if not path.is_file():
        raise ModelError(f"model path {str(path)!r} is not a file")
    if path.stat().st_size == 0:
        raise ModelError(f"model file {str(path)!r} is empty; expected an ONNX model")
    try:
        model = ir.load(str(path))
    except Exception as err:  # protobuf DecodeError, onnx errors: all mean "not a readable ONNX file"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"model file {str(path)!r} is not a readable ONNX model ({first})") from None
    if len(model.graph) == 0:
        raise ModelError(f"model file {str(path)!r} has an empty graph")
    return model


def default_opset(model: ir.Model) -> int:
    return int(model.opset_imports.get("", model.graph.opset_imports.get("", 0)))


def read_initializer(value: ir.Value):
    """The numpy array of a constant value, reading external data if needed, with a clear error if it is gone.

    External data is read into an array of its own and the file's mapping closed again (``read_external``): a
    mapped page the process has touched counts in its resident memory for as long as the mapping lives, so keeping
    onnx-ir's whole-file mappings open would make every weight ever read resident until the end of the run.
    """
    tensor = value.const_value
    if tensor is None:
        raise ModelError(f"tensor {value.name!r} is not a constant initializer")
    try:
        return read_external(tensor) if isinstance(tensor, ir.ExternalTensor) else tensor.numpy()
    except FileNotFoundError as err:
        raise ModelError(f"external data of tensor {value.name!r} is missing: {err}") from None
    except Exception as err:
        raise ModelError(f"cannot read tensor {value.name!r}: {err}") from None


def read_external(tensor: ir.ExternalTensor) -> np.ndarray:
    """A private copy of an external tensor's data; the tensor's memory map (if this opened one) is closed.

    Memory then belongs to the returned array alone and goes when the caller drops it. A mapping some other reader
    still holds a view of stays open (closing it would fail); it goes with the tensor.
    """
    had_map = tensor.raw is not None
    arr = np.array(tensor.numpy(), copy=True)
    if not had_map:
        release(tensor)
    return arr


def release(tensor) -> None:
    """Close an ExternalTensor's memory map (its touched pages stop counting as ours); other tensors: nothing."""
    if isinstance(tensor, ir.ExternalTensor) and tensor.raw is not None:
        try:
            tensor.release()
        except BufferError:  # a view of the map is still alive somewhere: leave it, it is closed with the tensor
            pass


def graph_names(graph: ir.Graph) -> set[str]:
    """Every value and node name of ``graph`` and its subgraphs (new names must avoid them all)."""
    names = {v.name for v in list(graph.inputs) + list(graph.outputs) + list(graph.initializers.values()) if v.name}
    for node in ir.traversal.RecursiveGraphIterator(graph):
        if node.name:
            names.add(node.name)
        names.update(v.name for v in list(node.inputs) + list(node.outputs) if v is not None and v.name)
    return names


def name_factory(graph: ir.Graph):
    """``fresh(base)``: ``base``, or ``base_1``, ``base_2``... the first name no value or node of ``graph`` (nor an
    earlier call) uses: how transforms name what they add."""
    taken = graph_names(graph)

    def fresh(base: str) -> str:
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        return name

    return fresh
