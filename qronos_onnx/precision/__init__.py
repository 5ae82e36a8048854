"""Mixed precision: per-target formats from layer rules (plan.py) and a bit budget spent where the measured
sensitivity says it helps most (sensitivity.py)."""
from .plan import (LayerPlan, act_label, average_bits, is_mixed, promote, resolve_plan, storage_bits,
                   weight_label)
from .sensitivity import AUTO_SAMPLES_MAX, BudgetResult, apply_target_bits

__all__ = ["AUTO_SAMPLES_MAX", "BudgetResult", "LayerPlan", "act_label", "apply_target_bits", "average_bits",
           "is_mixed", "promote", "resolve_plan", "storage_bits", "weight_label"]
