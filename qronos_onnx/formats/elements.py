"""Element types of the float/MX weight formats and ElementGrid, their frozen grid with IntGrid's interface.

Code convention (what ``ElementGrid.codes`` returns and ``QuantizedWeight.codes`` stores, always an integer):

* ``e2m1`` (MXFP4): code = 2 * e2m1 value, an integer in [-12, 12]; the grid scale is the *code unit*
  X / 2 with X = 2^e the OCP shared scale. decode = code * scale. These are exactly the INT8 codes and FLOAT
  scale of the onnxruntime-runnable DequantizeLinear (onnx_encodings.md §8.4); the canonical DQ
  writes the e2m1 value code / 2 with E8M0 scale X = 2 * scale.
* ``int8`` (MXINT8): code = the int8 element, in [-127, 127] (symmetric, as the microxcaling reference clamps);
  element value = code * 2^-6, grid scale = X * 2^-6. decode = code * scale; the canonical DQ writes the code with
  E8M0 scale X * 2^-6 = scale (the implicit 2^-6 folded into the exponent, onnx_encodings.md §8.4), so e >= -121.
* ``e4m3fn`` (MXFP8, FP8): code = sign * (7-bit magnitude pattern of the e4m3fn byte), in [-126, 126]
  (0x7F is NaN and never produced). The pattern order is the value order, so codes are monotone in the value.
  decode = e4m3_value(code) * scale with grid scale X (MX) or the per-channel float scale (FP8); the file's
  FLOAT8E4M3FN byte is ``0x80 * (code < 0) | |code|``.

Rounding is round-to-nearest, ties to even mantissa (OCP MX §6.3, IEEE), saturating at the largest magnitude
(6, 448, 127/64): the same rule ``QuantizeLinear(saturate=1)`` applies. Every decoded value is an exact product in
float32, so the solver's values, ``QuantizedWeight.dequantize()`` and the runtime's DequantizeLinear agree bit for bit.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import torch


@dataclass(frozen=True)
class ElementType:
    """One element encoding. ``shift``: log2 of (shared scale X / grid scale); the grid scale is the code unit.
    ``e8m0_shift``: log2 of (E8M0 scale of the canonical DQ / grid scale)."""

    name: str
    bits: int
    max_value: float  # largest magnitude
    emax: int  # exponent of the largest power of two <= max_value (OCP emax_elem)
    min_log2: int  # log2 of the smallest positive value
    qmax: int  # largest code
    shift: int
    mbits: int = 0  # mantissa bits (float elements)
    emin: int = 0  # exponent of the smallest normal (float elements)
    linear: bool = True  # decode = code * scale (else a table lookup)
    e8m0_shift: int = 0

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes (float32, integer-valued) of ``x`` given in code units (value / grid scale)."""
        x = x.float()
        if self.mbits == 0:  # int8: uniform grid
            return torch.clamp(torch.round(x), -self.qmax, self.qmax) + 0.0
        y = x * float(2.0 ** -self.shift)  # element units (exact: power of two)
        a = y.abs()
        e = torch.clamp(_floor_log2(a), min=self.emin)
        quantum = _pow2(e - self.mbits)
        q = torch.clamp(torch.round(a / quantum) * quantum, max=self.max_value)  # RNE, then saturate
        if self.linear:
            mag = q * float(2.0 ** self.shift)
        else:  # magnitude bit pattern: (exponent field) * 2^m + mantissa, exact for normals and subnormals
            eq = torch.clamp(_floor_log2(q), min=self.emin)
            mag = (eq - self.emin).float() * float(2 ** self.mbits) + q / _pow2(eq - self.mbits)
        return torch.where(y < 0, -mag, mag) + 0.0  # +0.0 turns -0 into +0

    def values(self, codes: torch.Tensor) -> torch.Tensor:
        """Element value of each code, in code units (float32); the inverse of :meth:`encode` on its range."""
        if self.linear:
            return codes.float()
        idx = codes.abs().long()
        mag = _e4m3_table(str(codes.device))[idx.clamp_max(self.qmax)]
        return torch.where(codes < 0, -mag, mag)


def _floor_log2(a: torch.Tensor) -> torch.Tensor:
    """floor(log2 a) exactly (frexp), int32; a = 0 gives -10000 (callers clamp it to the element's emin)."""
    _, ex = torch.frexp(a)
    return torch.where(a > 0, ex.to(torch.int32) - 1, -10000)


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """2^e as float32 built from the exponent bits (exact on every device); e must be a normal exponent."""
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32)


@functools.lru_cache(maxsize=8)
def _e4m3_table(device: str) -> torch.Tensor:
    mags = np.arange(127, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    return torch.from_numpy(mags).to(device)


E2M1 = ElementType("e2m1", bits=4, max_value=6.0, emax=2, min_log2=-1, qmax=12, shift=1, mbits=1, emin=0,
                   e8m0_shift=1)
E4M3 = ElementType("e4m3fn", bits=8, max_value=448.0, emax=8, min_log2=-9, qmax=126, shift=0, mbits=3, emin=-6,
                   linear=False)
INT8 = ElementType("int8", bits=8, max_value=127 / 64, emax=0, min_log2=-6, qmax=127, shift=6)

MX_BLOCK = 32  # OCP MX v1.0 block size, along the input dimension
E8M0_MIN_EXP, E8M0_MAX_EXP = -127, 127
FORMAT_ELEMENTS = {"mxfp4": E2M1, "mxfp8": E4M3, "mxint8": INT8, "fp8": E4M3}
MX_FORMATS = ("mxfp4", "mxfp8", "mxint8")


@dataclass
class ElementGrid:
    """Frozen MX / FP8 grid with IntGrid's duck-typed interface (what the rounding solvers call).

    ``scale`` [..., rows, n_groups] is the code unit described in the module docstring: for MX formats a power of
    two 2^(e - shift) with e the E8M0 exponent; for ``fp8`` a per-channel float. ``zero_point`` is all zeros.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    format: str  # mxfp4 | mxfp8 | mxint8 | fp8
    group_size: int  # 32 for MX (also when a row has fewer columns); cols for per-channel
    cols: int
    scale_dtype: torch.dtype = torch.float32

    # --- the IntGrid attributes
    @property
    def element(self) -> ElementType:
        return FORMAT_ELEMENTS[self.format]

    @property
    def bits(self) -> int:
        return self.element.bits

    @property
    def qmin(self) -> int:
        return -self.element.qmax

    @property
    def qmax(self) -> int:
        return self.element.qmax

    @property
    def symmetric(self) -> bool:
        return True

    @property
    def n_groups(self) -> int:
        return self.scale.shape[-1]

    @property
    def per_channel(self) -> bool:
        return self.n_groups == 1

    # --- format facts the exporters use
    @property
    def is_mx(self) -> bool:
        return self.format in MX_FORMATS

    @property
    def linear(self) -> bool:
        """decode = code * scale (MXFP4, MXINT8): codes can be written as INT8 / MatMulNBits 8-bit."""
        return self.element.linear

    @property
    def scale_shift(self) -> int:
        """log2(shared scale X / grid scale): the OCP exponent e = log2(scale) + scale_shift (MX formats)."""
        return self.element.shift

    @property
    def e8m0_shift(self) -> int:
        """log2(E8M0 scale written by the canonical DQ / grid scale): 1 for MXFP4, 0 for MXFP8 and MXINT8."""
        return self.element.e8m0_shift

    def to(self, device: torch.device | str) -> "ElementGrid":
        return dataclasses.replace(self, scale=self.scale.to(device), zero_point=self.zero_point.to(device))

    def group_index(self, cols: torch.Tensor | slice | int | None = None) -> torch.Tensor:
        idx = torch.arange(self.cols, device=self.scale.device)
        if cols is not None:
            idx = idx[cols]
        return torch.div(idx, self.group_size, rounding_mode="floor")

    def _scale(self, cols) -> torch.Tensor:
        if self.per_channel:
            return self.scale
        if isinstance(cols, int):
            g = cols // self.group_size
            return self.scale[..., g : g + 1]
        return self.scale[..., self.group_index(cols)]

    def codes(self, values: torch.Tensor, cols: torch.Tensor | slice | int | None = None) -> torch.Tensor:
        """Nearest element (ties to even, saturating) of ``values`` = ``W[..., :, cols]``, as float codes."""
        return self.element.encode(values.float() / self._scale(cols))

    def decode(self, codes: torch.Tensor, cols: torch.Tensor | slice | int | None = None) -> torch.Tensor:
        return self.element.values(codes) * self._scale(cols)

    def round(self, values: torch.Tensor, cols: torch.Tensor | slice | int | None = None) -> torch.Tensor:
        return self.decode(self.codes(values, cols), cols)

    def slice_rows(self, rows: slice) -> "ElementGrid":
        return dataclasses.replace(self, scale=self.scale[..., rows, :], zero_point=self.zero_point[..., rows, :])


def e4m3_bytes(codes: np.ndarray) -> np.ndarray:
    """Sign-magnitude e4m3 codes -> FLOAT8E4M3FN array (the byte ``0x80 * (code < 0) | |code|``)."""
    c = np.asarray(codes).astype(np.int16)
    raw = (np.abs(c) | np.where(c < 0, 0x80, 0)).astype(np.uint8)
    return raw.view(ml_dtypes.float8_e4m3fn)
