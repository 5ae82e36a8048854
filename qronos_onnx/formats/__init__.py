from .grid import IntGrid, int_range, make_int_grid
from .quantized_weight import QuantizedWeight

__all__ = ["IntGrid", "QuantizedWeight", "int_range", "make_int_grid"]
