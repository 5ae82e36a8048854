"""What a decoder graph needs besides its tokens, for one prefill pass: recognised by the graph's inputs and outputs.

Text calibration and ``eval --task ppl`` feed token windows. A causal LM exported for generation also takes (and
returns) a key/value cache and a few bookkeeping inputs; for a prefill pass (the whole window at once, nothing cached)
every one of them has a fixed value, built here:

- ``attention_mask`` [batch, past + seq]: ones [batch, seq] (rank 2 only);
- ``position_ids`` [batch, seq] or [seq]: 0 .. seq-1; ``cache_position`` [seq]: 0 .. seq-1;
- ``token_type_ids``: zeros (one segment);
- past key/value inputs (optimum and the onnxruntime-genai builder: ``past_key_values.N.key`` / ``.value``; other
  exports: any float input whose name holds ``past`` and ``key``/``value`` (or ``k``/``v``), e.g. ``past_key_3``,
  ``past.3.value``): zeros with a past length of 0, of the input's own dtype. The layout is read from the declared
  shape: axis 0 is the batch, exactly one other axis is symbolic (the past length, set to 0), every other axis is
  fixed (for [batch, kv_heads, past, head_dim] these give the number of KV heads and the head size);
- the genai / GroupQueryAttention inputs ``seqlens_k`` [batch] int32 = seq - 1 (total length minus one) and
  ``total_sequence_length`` (scalar or [1]) int32 = seq;
- optimum's merged decoders: ``use_cache_branch`` [1] bool = False.
Present key/value outputs (names holding ``present``) are recognised so that they are never taken for the logits; a
prefill pass ignores them.

Anything else (an unknown input, a past whose length is fixed, a 4-D mask) cannot be built: the error names each such
input on one line with the shape and dtype the graph expects.

Symbolic dims that are not the past length can be given values (``dims`` of ``plan_prefill``, or ``known_dims(...)``
around a call that plans deeper down): the onnxruntime-genai builder declares the head size of its cache as
``kv_cache_dim``, which only its ``genai_config.json`` resolves (``qronos_onnx/genai.py``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np

from ..errors import CalibrationError
from .specs import InputSpec

_PAST = re.compile(r"past", re.I)
_KEY = re.compile(r"key|(^|[._])k($|[._\d])", re.I)
_VALUE = re.compile(r"value|(^|[._])v($|[._\d])", re.I)
_LAYER = re.compile(r"(\d+)")
_PRESENT = re.compile(r"present", re.I)

# role -> what it holds, for messages and `inspect`
ROLES = {
    "input_ids": "the window's tokens",
    "attention_mask": "ones",
    "position_ids": "0 .. seq-1",
    "cache_position": "0 .. seq-1",
    "token_type_ids": "zeros",
    "past": "zeros, past length 0",
    "seqlens_k": "seq - 1 (total length - 1)",
    "total_sequence_length": "seq",
    "use_cache_branch": "False (no cache)",
}
_INT_ROLES = ("input_ids", "attention_mask", "position_ids", "cache_position", "token_type_ids", "seqlens_k",
              "total_sequence_length")


@dataclass(frozen=True)
class Synthesised:
    """One graph input and how a prefill feed fills it."""

    spec: InputSpec
    role: str
    past_axis: int | None = None  # past inputs: the axis whose length is 0
    kind: str = ""  # past inputs: "key" or "value"
    layer: int | None = None  # past inputs: the layer index in the name, if any

    @property
    def name(self) -> str:
        return self.spec.name

    def shape_for(self, batch: int | str, seq: int | str) -> list:
        """The fed shape, for a batch and a window length (ints, or names for a description)."""
        spec = self.spec
        if self.role == "past":
            dims = list(spec.shape)
            dims[0] = batch if not isinstance(dims[0], int) else dims[0]
            dims[self.past_axis] = 0
            return dims
        if self.role in ("input_ids", "attention_mask", "token_type_ids"):
            return [batch, seq]
        if self.role == "position_ids":
            return [batch, seq] if spec.rank in (None, 2) else [seq]
        if self.role == "cache_position":
            return [seq]
        if self.role == "seqlens_k":
            return [batch]
        if self.role == "total_sequence_length":
            return [] if spec.rank == 0 else [1]
        return [1]  # use_cache_branch

    def build(self, ids: np.ndarray) -> np.ndarray:
        """The value for a prefill pass over ``ids`` [batch, seq]."""
        batch, seq = ids.shape
        dtype = self.spec.dtype
        if self.role == "input_ids":
            return ids.astype(dtype)
        if self.role == "attention_mask":
            return np.ones((batch, seq), dtype=dtype)
        if self.role == "token_type_ids":
            return np.zeros((batch, seq), dtype=dtype)
        if self.role == "position_ids":
            pos = np.arange(seq, dtype=dtype)
            return pos if self.spec.rank == 1 else np.broadcast_to(pos, (batch, seq)).copy()
        if self.role == "cache_position":
            return np.arange(seq, dtype=dtype)
        if self.role == "seqlens_k":
            return np.full((batch,), seq - 1, dtype=dtype)
        if self.role == "total_sequence_length":
            return np.full(self.shape_for(batch, seq), seq, dtype=dtype)
        if self.role == "use_cache_branch":
            return np.zeros((1,), dtype=dtype)
        return np.zeros(self.shape_for(batch, seq), dtype=dtype)  # past: zero length


@dataclass
class PrefillPlan:
    """How to feed a graph one prefill pass from token windows: every input's role, and the present outputs."""

    entries: list[Synthesised]
    presents: list[str]

    @property
    def ids_name(self) -> str:
        return next(e.name for e in self.entries if e.role == "input_ids")

    @property
    def past(self) -> list[Synthesised]:
        return [e for e in self.entries if e.role == "past"]

    @property
    def has_cache(self) -> bool:
        return bool(self.past) or any(e.role in ("seqlens_k", "total_sequence_length", "use_cache_branch",
                                                  "cache_position") for e in self.entries)

    def feed(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """The feed for windows ``ids`` [batch, seq] (every graph input, in graph order)."""
        ids = np.asarray(ids)
        if ids.ndim != 2:
            raise ValueError(f"ids must be [batch, seq], got shape {ids.shape}")
        return {e.name: e.build(ids) for e in self.entries}

    def describe(self, batch: int | str = "batch", seq: int | str = "seq") -> list[str]:
        """One line per synthesised input (past inputs grouped when they share a shape), for ``inspect``."""
        lines = []
        for e in self.entries:
            if e.role in ("input_ids", "past"):
                continue
            lines.append(f"{e.name}: {ROLES[e.role]} {_dims(e.shape_for(batch, seq))} {e.spec.dtype}")
        groups: dict[tuple, list[Synthesised]] = {}
        for e in self.past:
            groups.setdefault((tuple(e.shape_for(batch, seq)), str(e.spec.dtype), e.past_axis), []).append(e)
        for (shape, dtype, axis), members in groups.items():
            fixed = [d for i, d in enumerate(shape) if i not in (0, axis)]
            layout = (f"kv heads {fixed[0]}, head dim {fixed[1]}" if len(shape) == 4 and axis == 2
                      else f"past length on axis {axis}")
            layers = sorted({m.layer for m in members if m.layer is not None})
            names = (members[0].name if len(members) == 1 else
                     f"{len(members)} past key/value inputs ({members[0].name} .. {members[-1].name}"
                     + (f", {len(layers)} layers" if layers else "") + ")")
            lines.append(f"{names}: {ROLES['past']} {_dims(list(shape))} {dtype} ({layout})")
        if self.presents:
            lines.append(f"{len(self.presents)} present key/value output(s) ({self.presents[0]} .. "
                         f"{self.presents[-1]}): computed, not read" if len(self.presents) > 1 else
                         f"present output {self.presents[0]}: computed, not read")
        return lines


def _dims(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _is_float(spec: InputSpec) -> bool:
    return spec.dtype.kind == "f" or spec.elem_type in ("BFLOAT16", "FLOAT16", "FLOAT", "DOUBLE")


def _past_entry(spec: InputSpec) -> Synthesised | str:
    """A past key/value input's plan, or why it cannot be built (the expected shape)."""
    bare = re.sub(r"key_values", "", spec.name, flags=re.I)  # past_key_values.0.value: the kind is after the prefix
    kind = "value" if _VALUE.search(bare) else "key"
    layer_match = _LAYER.search(spec.name)
    layer = int(layer_match.group(1)) if layer_match else None
    if spec.shape is None or len(spec.shape) < 2:
        return "a past key/value input needs a declared shape [batch, ..., past_length, ...] to build a zero-length past"
    symbolic = [i for i, d in enumerate(spec.shape) if i > 0 and not isinstance(d, int)]
    zero = [i for i, d in enumerate(spec.shape) if i > 0 and d == 0]
    if zero and not symbolic:
        axis = zero[0]
    elif len(symbolic) == 1:
        axis = symbolic[0]
    elif not symbolic:
        return ("past key/value input with a fixed past length (a static or shared-buffer cache); a prefill pass needs "
                "a zero-length past: export with a dynamic past length")
    elif len(spec.shape) == 4 and 2 in symbolic:
        return ("past key/value input with more than one dynamic dim besides the batch: cannot tell the number of KV "
                "heads and the head size; export with them fixed ([batch, kv_heads, past_length, head_dim])"
                + ("; for an onnxruntime-genai model give its folder (genai_config.json holds the head size)"
                   if "kv_cache_dim" in spec.shape else ""))
    else:
        return "past key/value input with more than one dynamic dim besides the batch: cannot tell the past length axis"
    return Synthesised(spec, "past", axis, kind, layer)


def _role(spec: InputSpec) -> str | None:
    name = spec.name
    if name in ROLES and name != "past":
        return name
    if _PAST.search(name) and (_KEY.search(name) or _VALUE.search(name)) and _is_float(spec):
        return "past"
    return None


def _check_role(entry: Synthesised) -> str | None:
    """Why a recognised input cannot take its prefill value (rank or dtype), or None."""
    spec, role = entry.spec, entry.role
    if role in _INT_ROLES and spec.dtype.kind not in "iu":
        return f"expected an integer type for {role}"
    if role == "use_cache_branch" and spec.dtype != np.bool_:
        return "expected a bool [1]"
    rank = spec.rank
    if rank is None:
        return None
    want = {"input_ids": (2,), "attention_mask": (2,), "token_type_ids": (2,), "position_ids": (1, 2),
            "cache_position": (1,), "seqlens_k": (1,), "total_sequence_length": (0, 1),
            "use_cache_branch": (1,)}.get(role)
    if want is not None and rank not in want:
        return f"{role} is built with rank {' or '.join(map(str, want))}, the graph input has rank {rank}"
    return None


def expected(spec: InputSpec) -> str:
    """The graph input's declared shape and dtype, e.g. ``[batch, 3] float32``."""
    shape = "[?]" if spec.shape is None else _dims(spec.shape)
    return f"{shape} {spec.elem_type.lower() if spec.elem_type else spec.dtype}"


_KNOWN_DIMS: ContextVar[Mapping[str, int]] = ContextVar("qronos_known_dims", default={})


@contextlib.contextmanager
def known_dims(dims: Mapping[str, int]) -> Iterator[None]:
    """Values of symbolic dims (e.g. ``{"kv_cache_dim": 64}``) for every ``plan_prefill`` inside the block: how a
    caller that knows them (a genai folder's config) reaches the text calibration deep inside ``quantize()``."""
    token = _KNOWN_DIMS.set({**_KNOWN_DIMS.get(), **dims})
    try:
        yield
    finally:
        _KNOWN_DIMS.reset(token)


def _resolve_dims(spec: InputSpec, dims: Mapping[str, int]) -> InputSpec:
    if not dims or spec.shape is None:
        return spec
    shape = tuple(int(dims[d]) if isinstance(d, str) and d in dims else d for d in spec.shape)
    return spec if shape == spec.shape else dataclasses.replace(spec, shape=shape)


def plan_prefill(specs: Sequence[InputSpec], output_names: Sequence[str] = (), *, ids_name: str = "input_ids",
                 error=CalibrationError, what: str = "text calibration",
                 dims: Mapping[str, int] | None = None) -> PrefillPlan:
    """Recognise every graph input (see the module docstring); refuse, one line per input, what cannot be built.

    ``dims``: values for named symbolic dims (on top of any ``known_dims`` in force), e.g. a cache's head size."""
    entries, bad = [], []
    known = {**_KNOWN_DIMS.get(), **(dims or {})}
    for spec in (_resolve_dims(s, known) for s in specs):
        role = "input_ids" if spec.name == ids_name else _role(spec)
        if role is None:
            bad.append(f"{spec.name!r} (graph input {expected(spec)}): not a token, mask, position or past key/value "
                       f"input")
            continue
        entry = _past_entry(spec) if role == "past" else Synthesised(spec, role)
        if isinstance(entry, str):
            bad.append(f"{spec.name!r} (graph input {expected(spec)}): {entry}")
            continue
        why = _check_role(entry)
        if why:
            bad.append(f"{spec.name!r} (graph input {expected(spec)}): {why}")
            continue
        entries.append(entry)
    if bad:
        head = f"{what} cannot build graph input "
        built = "input_ids, attention_mask, position_ids, token_type_ids, past key/values, seqlens_k, ..."
        if len(bad) == 1:
            raise error(head + bad[0] + f"; it builds {built}; give .npz samples instead"
                        if what == "text calibration" else head + bad[0])
        raise error(f"{what} cannot build {len(bad)} graph inputs:\n" + "\n".join("  " + b for b in bad))
    presents = [n for n in output_names if _PRESENT.search(n)]
    return PrefillPlan(entries, presents)


def specs_from_ort(args) -> list[InputSpec]:
    """InputSpecs of onnxruntime ``NodeArg``s (``session.get_inputs()``)."""
    types = {"tensor(float)": ("FLOAT", np.float32), "tensor(float16)": ("FLOAT16", np.float16),
             "tensor(double)": ("DOUBLE", np.float64), "tensor(int64)": ("INT64", np.int64),
             "tensor(int32)": ("INT32", np.int32), "tensor(bool)": ("BOOL", np.bool_),
             "tensor(int8)": ("INT8", np.int8), "tensor(uint8)": ("UINT8", np.uint8)}
    out = []
    for a in args:
        elem, dtype = types.get(a.type, (a.type, None))
        if dtype is None:
            try:
                import ml_dtypes
                dtype = {"tensor(bfloat16)": ml_dtypes.bfloat16}[a.type]
                elem = "BFLOAT16"
            except Exception:
                dtype = np.float32 if "float" in a.type else np.int64
        shape = None if a.shape is None else tuple(d if isinstance(d, int) else (d or None) for d in a.shape)
        out.append(InputSpec(a.name, np.dtype(dtype), shape, elem))
    return out


def prefill_lines(model) -> list[str]:
    """``inspect``'s lines: what text calibration and ``eval --task ppl`` build for this graph (an ``ir.Model``), or
    the line saying what they cannot build."""
    from .specs import graph_input_specs

    specs = graph_input_specs(model)
    if "input_ids" not in {s.name for s in specs}:
        return []
    try:
        plan = plan_prefill(specs, [v.name for v in model.graph.outputs], what="text calibration and ppl")
    except CalibrationError as err:
        return [f"text/ppl feeds: {line.strip()}" for line in str(err).splitlines()]
    lines = plan.describe()
    if not lines:
        return []
    head = ("synthesised for text calibration and ppl (a prefill pass" +
            (", past length 0):" if plan.has_cache else "):"))
    return [head] + ["  " + line for line in lines]
