"""Graph transforms on the float model, applied between loading and capture (docs/ARCHITECTURE.md, order of
operations in qronos_algorithm.md §4.1). Each returns a float model computing the same function (to float32
round-off) and records what it did in a ``TransformLog``, which the report shows per target.

- ``online``: a randomized Hadamard rotation in front of every MatMul / Gemm input, kept in float at run time.
- ``fused``: QuaRot-style rotations fused into the weights of a decoder's residual stream (no run-time cost but
  one online Hadamard per block, at the down_proj input).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TransformLog:
    """What the transforms did: per target node, the transforms that touched its weight or input; free notes (e.g. a
    fallback and the node that caused it); the float rotation MatMuls left in the graph."""

    touched: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    float_rotations: list[str] = field(default_factory=list)

    def touch(self, node: str, transform: str) -> None:
        names = self.touched.setdefault(node, [])
        if transform not in names:
            names.append(transform)

    def to_dict(self) -> dict:
        return {"touched": self.touched, "notes": self.notes, "float_rotation_nodes": len(self.float_rotations)}
