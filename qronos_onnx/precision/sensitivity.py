"""--target-bits: measure what each target's quantization costs the model's output, and promote greedily.

The measure is the relative error at the model's outputs, ``sum ||y_q - y||^2 / sum ||y||^2`` over a few calibration
samples, where ``y`` is the float model and ``y_q`` the model quantized by a plan (round-to-nearest weights on each
target's grid and, for W+A formats, each target's activation quantizer). It includes how much the rest of the
network amplifies or absorbs a layer's error, and it sees activation quantization, which the per-layer weight error
in the report does not. Two ways to turn it into a choice (``precision.sensitivity``):

- ``in-context`` (default): start from the whole model quantized at the requested format; the benefit of promoting
  ``t`` is how much the output error drops when only ``t`` is promoted. Targets are taken by benefit per added bit
  for a share of the budget, then the remaining ones are measured again in the new context
  (``precision.sensitivity_rounds`` rounds). Errors do not add: on a depthwise CNN under MXFP4 activations the stem
  conv alone costs 0.6 % output error but promoting it in the quantized model removes half of the error, because
  every later quantizer amplifies what it lets through (``docs/mixed_precision.md``).
- ``isolated``: the error each target causes with only that target quantized, base format vs promoted, taken
  greedily (lazily: the base error bounds the benefit). Blind to those interactions, yet measured 1-2 points better
  on some models (W4A4 GPTQ on the PP-OCR classifier, W3 SmolLM2), against 4-15 points worse under MXFP4.

The unit of promotion is a weight, or under W+A formats every target reading one activation tensor (they share its
quantizer): see ``_units``.

Cost: one onnxruntime graph of the whole float model with every target weight fed as an input (built once), every
activation quantizer behind an ``If`` on a boolean switch so that one graph serves every plan and only the quantizers
switched on are computed; then ``sensitivity_samples`` passes per candidate and round (in-context) or per candidate
and level (isolated), each running only the nodes from the deepest cut above the changed target on.
"""
from __future__ import annotations

import heapq
import logging
import math
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import torch
from tqdm import tqdm

from ..capture.act_calib import plan_activations
from ..capture.runner import SegmentRunner
from ..config import QuantConfig
from ..errors import ConfigError
from ..export.activations import ActQuantizer, build_quantizer
from ..formats import make_grid
from ..graph.model import read_initializer
from ..graph.schedule import Segment, suffix_segment, target_depths
from ..graph.targets import Target, weight_matrix
from ..threads import pinned_threads, torch_threads
from .plan import LayerPlan, average_bits, promote, storage_bits

log = logging.getLogger(__name__)


AUTO_OUTPUT_VALUES = 1 << 16  # precision.sensitivity_samples unset: output values the measure should sum over
AUTO_SAMPLES_MAX = 4


@dataclass
class Candidate:
    """Targets promoted together: every node reading one activation tensor (q/k/v, gate/up: they share its
    quantizer) and every node reading one of their weights. ``weight`` names them for the report."""

    weight: str
    targets: list[Target]
    extra_bits: float  # storage added by the promotion
    weights: list[str] = field(default_factory=list)  # the weight names (``[weight]`` when empty)
    base_error: float = float("nan")  # the output error before promoting it (isolated: with only it quantized)
    promoted_error: float | None = None  # ... and after (isolated: measured lazily)
    round: int = 0  # in-context: the round of its last measurement

    @property
    def weight_names(self) -> list[str]:
        return self.weights or [self.weight]

    @property
    def nodes(self) -> list[str]:
        return [t.name for t in self.targets]


@dataclass
class BudgetResult:
    plans: dict[str, LayerPlan]
    target_bits: float
    base_bits: float
    final_bits: float
    promoted: list[str] = field(default_factory=list)  # weight names, in the order they were chosen
    candidates: list[Candidate] = field(default_factory=list)
    runs: int = 0  # forward passes of the whole model
    samples: int = 0  # calibration samples each measurement ran
    seconds: float = 0.0
    method: str = "in-context"
    rounds: list[dict] = field(default_factory=list)  # in-context: output error and promotions per round

    def to_dict(self) -> dict:
        return {
            "target_bits": self.target_bits, "base_bits": round(self.base_bits, 4),
            "final_bits": round(self.final_bits, 4), "promoted": self.promoted, "forward_passes": self.runs,
            "samples": self.samples,
            "seconds": round(self.seconds, 2), "method": self.method, "measure": _MEASURES[self.method],
            "rounds": self.rounds,
            "sensitivity": [{"weight": c.weight, "weights": c.weight_names, "nodes": c.nodes,
                             "extra_bits": c.extra_bits,
                             "base_error": c.base_error, "promoted_error": c.promoted_error,
                             **({"round": c.round} if self.method == "in-context" else {})}
                            for c in sorted(self.candidates, key=lambda c: -_benefit(c))],
        }


_MEASURES = {
    "in-context": "relative output error of the whole model quantized by the plan (RTN weights + activation "
                  "quantizers), before and after promoting only that target, re-measured each round",
    "isolated": "relative output error of the model with only that target quantized (RTN weights + its "
                "activation quantizer), base format vs promoted",
}


def _units(targets: list[Target], by_tensor: bool = True) -> list[list[Target]]:
    """Targets joined when they read the same weight or (``by_tensor``) the same activation tensor (union-find), in
    graph order.

    Why by tensor under W+A formats: those targets share one activation quantizer, which a promotion changes for all
    of them; it also takes the measurement from 7 passes to 4 per transformer block. Weight-only runs keep one unit
    per weight: grouping q/k/v there cost SmolLM2 W3 ``--target-bits 3.25`` 1.7 points of perplexity (33.52 against
    31.79) for 43 % fewer passes."""
    parent = list(range(len(targets)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    seen: dict[tuple[str, str], int] = {}
    for i, t in enumerate(targets):
        for key in ((("x", t.input_name),) if by_tensor else ()) + (("w", t.weight_name),):
            j = seen.setdefault(key, i)
            parent[root(i)] = root(j)
    groups: dict[int, list[Target]] = {}
    for i, t in enumerate(targets):
        groups.setdefault(root(i), []).append(t)
    return list(groups.values())


def _benefit(c: Candidate) -> float:
    if c.promoted_error is None or not math.isfinite(c.base_error):
        return -math.inf
    return c.base_error - c.promoted_error


def apply_target_bits(model: ir.Model, targets: list[Target], everything: list[Target],
                      samples: Sequence[Mapping[str, np.ndarray]], plans: dict[str, LayerPlan], cfg: QuantConfig,
                      *, quiet: bool = False) -> BudgetResult:
    """Promote targets until the average storage bits over ``everything`` (all targets, float ones included)
    reach ``cfg.precision.target_bits``. ``targets`` are the ones being quantized. Returns the new plans."""
    t_start = time.perf_counter()
    budget = float(cfg.precision.target_bits)
    base = average_bits(everything, plans)
    if base > budget + 1e-9:
        raise ConfigError(f"--target-bits {budget:g} is below what the chosen formats already cost ({base:.3f} bits "
                          f"per weight, scales and zero points counted); ask for at least {base:.3f}, or start "
                          f"from a lower-bit format")
    params = {}
    for t in everything:
        g, r, c = t.matrix_shape
        params[t.weight_name] = g * r * c
    total_params = sum(params.values())
    cands = []
    shared_quantizers = any(p is not None and p.activations.enabled
                            for t in targets for p in (plans[t.name], promote(plans[t.name])))
    for ts in _units(targets, by_tensor=shared_quantizers):
        if any(plans[t.name].source == "layer-config" for t in ts):  # the user's explicit choice stands
            continue
        ups = {t.name: promote(plans[t.name]) for t in ts}
        if any(up is None for up in ups.values()):
            continue
        first = {}
        for t in ts:
            first.setdefault(t.weight_name, t)
        extra = sum(storage_bits(t, ups[t.name].weights) - storage_bits(t, plans[t.name].weights)
                    for t in first.values())
        cands.append(Candidate(" + ".join(first), ts, extra, weights=list(first)))
    if not cands:
        raise ConfigError(f"--target-bits: no target can be promoted from {plans[targets[0].name].weight_label()} "
                          "(promotions: int2/int3 -> int4, int4..int7 -> int8, mxfp4 -> mxfp8); choose a lower-bit "
                          "format or drop --target-bits")
    room = (budget - base) * total_params
    method = cfg.precision.sensitivity
    result = BudgetResult(dict(plans), budget, base, base, candidates=cands, method=method)
    if room < min(c.extra_bits for c in cands):
        log.warning("note: --target-bits %g leaves no room for a promotion (the formats cost %.3f bits per weight)",
                    budget, base)
        result.seconds = time.perf_counter() - t_start
        return result
    with _Probe(model, targets, samples, plans, cfg, quiet=quiet) as probe:
        if method == "isolated":
            chosen = _isolated(cands, room, plans, probe, quiet)
        else:
            chosen = _in_context(cands, room, plans, probe, cfg.precision.sensitivity_rounds, result.rounds, quiet,
                                 recheck=float(cfg.precision.sensitivity_recheck))
        result.runs, result.samples = probe.runs, len(probe.samples)
    for c in chosen:
        for t in c.targets:
            result.plans[t.name] = promote(plans[t.name])
        result.promoted += c.weight_names
    result.final_bits = average_bits(everything, result.plans)
    result.seconds = time.perf_counter() - t_start
    return result


def _with(plans: Mapping[str, LayerPlan], base: Mapping[str, LayerPlan], cands: Sequence[Candidate]) -> dict:
    """``plans`` with the candidates' targets promoted from their ``base`` plan."""
    out = dict(plans)
    for c in cands:
        for t in c.targets:
            out[t.name] = promote(base[t.name])
    return out


def _in_context(cands: list[Candidate], room: float, plans: dict[str, LayerPlan], probe: "_Probe", rounds: int,
                log_rounds: list[dict], quiet: bool, recheck: float = 1.0) -> list[Candidate]:
    """Each round: measure, in the model quantized by the current plan, what promoting each candidate alone
    removes from the output error; promote the best per added bit until the round's share of the budget (the room
    left over the rounds left) is spent. The last round may spend all that is left. By default every round
    measures every candidate left, because the benefits change with the context: ``recheck`` < 1 measures again
    only that share of them, the best by their last benefit per bit, which on the PP-OCR classifier at 5 bits
    (3 rounds, a third re-measured) cut its passes by a third or more (its seconds by 17-29 %), gained 0.7 points
    of top-1 under W4A4 GPTQ and lost 0.9 and 3.1 under MXFP4 GPTQ and RTN (``bench/results/target_bits_cost/``).

    Promotions measured one at a time can raise the output error together (SmolLM2 W3: one round's 25 took it from
    0.33 to 1.16). Checking each round by a whole-model run and keeping the best prefix was tried: it lowered that
    error but left a third of the extra bits unspent and the perplexity rose from 31.79 to 36.05, so the rounds stay
    unchecked (``bench/results/smollm2/smollm2-w3-pc-tb3.25-qronos.checked.json``)."""
    chosen: list[Candidate] = []
    left = list(cands)
    current = dict(plans)
    bar = tqdm(total=len(cands), desc="sensitivity", unit="pass", disable=quiet, leave=False)
    for r in range(rounds):
        if not left or room < min(c.extra_bits for c in left):
            break
        measure = left
        if r > 0 and recheck < 1.0:  # only the best by their last measured benefit per bit
            measure = sorted(left, key=lambda c: -_benefit(c) / c.extra_bits)[:max(1, math.ceil(recheck * len(left)))]
        if r > 0:
            bar.total += len(measure)
            bar.refresh()
        error = probe.set_context(current)
        for start in range(0, len(measure), probe.batch):
            chunk = measure[start:start + probe.batch]
            for c, e in zip(chunk, probe.errors([(c.targets, _with(current, plans, [c])) for c in chunk])):
                c.base_error, c.promoted_error, c.round = error, e, r + 1
            bar.update(len(chunk))
        share = room / (rounds - r)
        spent = 0.0
        taken = []
        for c in sorted(measure, key=lambda c: -_benefit(c) / c.extra_bits):
            if spent >= share or _benefit(c) <= 0:
                break
            if c.extra_bits <= room - spent:
                taken.append(c)
                spent += c.extra_bits
        log_rounds.append({"round": r + 1, "output_error": error, "measured": len(measure),
                           "promoted": [c.weight for c in taken]})
        if not taken:
            log.warning("note: --target-bits: no remaining promotion lowers the measured output error (%.4g) in "
                        "round %d; %.0f bits of the budget stay unspent", error, r + 1, room)
            break
        chosen += taken
        room -= spent
        current = _with(current, plans, taken)
        left = [c for c in left if c not in taken]
    bar.close()
    return chosen


def _isolated(cands: list[Candidate], room: float, plans: dict[str, LayerPlan], probe: "_Probe",
              quiet: bool) -> list[Candidate]:
    bar = tqdm(total=len(cands), desc="sensitivity", unit="target", disable=quiet, leave=False)
    for start in range(0, len(cands), probe.batch):
        chunk = cands[start:start + probe.batch]
        for c, e in zip(chunk, probe.errors([(c.targets, plans) for c in chunk])):
            c.base_error = e
        bar.update(len(chunk))
    bar.close()
    return _greedy(cands, room, lambda c: probe.error(c.targets, _with(plans, plans, [c])))


def _greedy(cands: list[Candidate], room: float, measure) -> list[Candidate]:
    """Best benefit per added bit first, within ``room`` bits. The error at the base format bounds the benefit, so a
    candidate's promoted error is measured only when its bound is the best left (lazy greedy: same choice as
    measuring everything)."""
    heap = [(-c.base_error / c.extra_bits, 0, i) for i, c in enumerate(cands) if c.base_error > 0]
    heapq.heapify(heap)
    chosen = []
    while heap and room > 0:
        neg, exact, i = heapq.heappop(heap)
        c = cands[i]
        if not exact:
            c.promoted_error = measure(c)
            benefit = c.base_error - c.promoted_error
            if benefit > 0:
                heapq.heappush(heap, (-benefit / c.extra_bits, 1, i))
            continue
        if c.extra_bits <= room:
            chosen.append(c)
            room -= c.extra_bits
    return chosen


class _Probe:
    """The float model in onnxruntime with every target weight an input and every activation quantizer behind a
    switch, so that one graph serves every plan.

    ``set_context(plans)`` runs the whole model quantized by ``plans`` (None: float) and keeps, per sample, its
    outputs and the tensors at a few cut depths. ``error(changed, plans)`` is the relative output error when the
    ``changed`` targets take their format from ``plans`` and every other target stays as in the context; only the
    nodes from the deepest cut above the changed targets on are run again (a target of depth d never changes
    what nodes of smaller depth compute), which on a chain of blocks saves about half of each pass.
    """

    def __init__(self, model: ir.Model, targets: list[Target], samples, plans: dict[str, LayerPlan],
                 cfg: QuantConfig, *, quiet: bool, cuts: int = 8):
        self.model, self.targets, self.cfg = model, targets, cfg
        graph = model.graph
        self.float_w = {t.weight_name: read_initializer(graph.initializers[t.weight_name]) for t in targets}
        feeds_names = [v.name for v in graph.inputs if v.name not in graph.initializers]
        asked = cfg.precision.sensitivity_samples
        n = min(asked or AUTO_SAMPLES_MAX, len(samples))
        self.samples = [{k: np.asarray(s[k]) for k in feeds_names if k in s} for s in list(samples)[:n]]
        self.quantizers = self._quantizers(plans, samples, quiet)
        # nodes reading one tensor with the same quantizers share their subgraphs and switches (q/k/v)
        by_input: dict[tuple[str, tuple[ActQuantizer, ...]], list[str]] = {}
        inputs_of = {t.name: t.input_name for t in targets}
        for node in sorted(self.quantizers):
            qs = tuple(sorted(self.quantizers[node], key=lambda q: q.describe()))
            by_input.setdefault((inputs_of[node], qs), []).append(node)
        self.switches: dict[tuple[str, ActQuantizer], str] = {}
        for (_, qs), nodes in by_input.items():
            for i, q in enumerate(qs):
                for node in nodes:
                    self.switches[(node, q)] = f"{nodes[0]}__switch{i}"
        self.zero = {name: np.zeros((), np.bool_) for name in self.switches.values()}
        self.outputs = [v.name for v in graph.outputs]
        weight_names = set(self.float_w)
        self.depth = target_depths(model, targets)
        levels = sorted({self.depth[t.name] for t in targets})
        picks = sorted({levels[round(i * (len(levels) - 1) / max(cuts - 1, 1))] for i in range(min(cuts, len(levels)))})
        self.suffixes = [suffix_segment(model, self.depth, d, weight_names, self.outputs) for d in picks]
        self.cut_depths = picks
        carried = sorted({v for seg in self.suffixes for v in seg.inputs
                          if v not in self.samples[0]} - set(self.outputs))
        used = {v.name for node in graph for v in node.inputs if v is not None}
        inits = [k for k in graph.initializers if k in used and k not in self.float_w]
        inputs = [k for k in feeds_names if k in self.samples[0]]
        whole = Segment(index=-1, nodes=[nd.name for nd in graph], inputs=inputs, outputs=self.outputs + carried,
                        weights=list(self.float_w), initializers=inits)
        hook = self._hook if self.quantizers else None
        self.threads = cfg.capture.threads
        # candidate passes are independent: run `workers` of them at once on one intra-op thread each, which beats
        # one pass at a time on `workers` threads wherever a pass is too small to keep every thread busy
        self.workers = max(1, pinned_threads(self.threads))
        self.batch = 4 * self.workers  # candidates handed to the pool at once (the progress bar moves per batch)
        self.whole = SegmentRunner(model, whole, self.samples[0], graph_hook=hook, threads=self.threads)
        self._runners: dict[int, SegmentRunner] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._weight_cache: dict[tuple[str, object], np.ndarray] = {}
        self._input_names: dict[int, list[str]] = {}
        self.runs = 0
        self.reference: list[list[np.ndarray]] = []
        if asked is None:
            self.samples = self.samples[:self._auto_samples()]
        self.set_context(None)
        self.reference = [list(ys) for ys in self._context_outputs]
        self.norm = sum(float(np.sum(np.square(y, dtype=np.float64))) for ys in self.reference for y in ys
                        if np.issubdtype(y.dtype, np.floating))

    def _auto_samples(self) -> int:
        """``sensitivity_samples`` unset: the fewest samples whose float outputs hold ``AUTO_OUTPUT_VALUES`` values
        (at most ``AUTO_SAMPLES_MAX``). The measure is a sum over output values: one 256-token window of an LLM
        gives 12 M logits, plenty to rank layers by, and a pass there costs a third of a second, while a batch of 8
        two-class predictions gives 16 values and costs milliseconds."""
        ys = self.whole.session.run(self.outputs, self._only(self.whole, {**self.float_w, **self.zero,
                                                                          **self.samples[0]}))
        self.runs += 1
        values = sum(int(np.size(y)) for y in ys if np.issubdtype(np.asarray(y).dtype, np.floating))
        return max(1, min(len(self.samples), math.ceil(AUTO_OUTPUT_VALUES / max(values, 1))))

    def __enter__(self) -> "_Probe":
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self.whole = None  # type: ignore[assignment]
        self._runners.clear()

    def _quantizers(self, plans, samples, quiet) -> dict[str, set[ActQuantizer]]:
        """node -> the activation quantizers it may need (its format and its promoted one), calibrated as the run
        will calibrate them."""
        by_cfg: dict[object, list[Target]] = {}
        for t in self.targets:
            for p in (plans[t.name], promote(plans[t.name])):
                if p is not None and p.activations.enabled:
                    by_cfg.setdefault(p.activations, []).append(t)
        out: dict[str, set[ActQuantizer]] = {}
        for acfg, ts in by_cfg.items():
            plan = plan_activations(self.model, ts, samples, acfg, self.cfg.capture, seed=self.cfg.seed)
            for name, q in plan.quantizers.items():
                out.setdefault(name, set()).add(q)
        return out

    def _hook(self, graph: ir.Graph, segment: Segment) -> None:
        """``If(s_0, q_0(x), If(s_1, q_1(x), x))`` in front of each target: exactly x while every switch is off, and
        only the quantizer switched on is computed (on a CNN under W+A formats, computing every quantizer on every
        pass tripled the cost of a pass). Targets reading one tensor with the same switches share it."""
        from ..graph.model import graph_names

        taken = graph_names(graph)
        built: dict[tuple[str, tuple[str, ...]], ir.Value] = {}
        for node in list(graph):
            qs = self.quantizers.get(node.name)
            if not qs:
                continue
            x = node.inputs[0]
            qs = sorted(qs, key=lambda q: q.describe())
            key = (x.name, tuple(self.switches[(node.name, q)] for q in qs))
            if key in built:
                node.replace_input_with(0, built[key])
                continue
            first = key[1][0]
            identity = ir.node("Identity", [x], name=f"{first}_float")
            identity.outputs[0].name = f"{first}_float_out"
            otherwise = ir.Graph([], [identity.outputs[0]], nodes=[identity], name=f"{first}_float")
            taken.update({identity.name, identity.outputs[0].name})
            outer: ir.Node | None = None
            for q in reversed(qs):
                name = self.switches[(node.name, q)]
                nodes, y = build_quantizer(graph, x, q, taken, prefix=f"{name}_q")  # constants in the outer graph
                then = ir.Graph([], [y], nodes=nodes, name=f"{name}_on")
                switch = ir.Value(name=name, type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([]))
                graph.inputs.append(switch)
                taken.add(name)
                outer = ir.Node("", "If", [switch], attributes=[ir.AttrGraph("then_branch", then),
                                                                ir.AttrGraph("else_branch", otherwise)],
                                num_outputs=1, name=f"{name}_if")
                outer.outputs[0].name = f"{name}_if_out"
                outer.outputs[0].dtype, outer.outputs[0].shape = x.dtype, x.shape
                if q is not qs[0]:
                    otherwise = ir.Graph([], [outer.outputs[0]], nodes=[outer], name=f"{name}_else")
            graph.insert_before(node, [outer])
            node.replace_input_with(0, outer.outputs[0])
            built[key] = outer.outputs[0]

    def _quantized_weight(self, t: Target, plan: LayerPlan) -> np.ndarray:
        key = (t.weight_name, plan.weights)
        if key not in self._weight_cache:
            with torch_threads(1):  # elementwise passes: a second thread only waits (threads.py), same bits
                W = weight_matrix(self.model, t)
                scale_dtype = torch.float16 if np.dtype(t.weight_dtype) == np.float16 else torch.float32
                grid = make_grid(W, plan.weights, scale_dtype, force_per_channel=(t.op_type == "Conv"),
                                 name=t.weight_name)
                Q = grid.round(W.float())
                self._weight_cache[key] = t.from_matrix(Q).contiguous().numpy().astype(t.weight_dtype, copy=False)
        return self._weight_cache[key]

    def _feeds(self, targets: Sequence[Target], plans: Mapping[str, LayerPlan]) -> dict[str, np.ndarray]:
        """Quantized weights and switches on for ``targets`` at their plans."""
        feeds: dict[str, np.ndarray] = {}
        for t in targets:
            plan = plans[t.name]
            if plan.is_float:
                continue
            feeds[t.weight_name] = self._quantized_weight(t, plan)
            if plan.activations.enabled:
                for (node, q), name in self.switches.items():
                    if node == t.name and _same(q, plan.activations):
                        feeds[name] = np.ones((), np.bool_)
        return feeds

    def _error(self, outputs: list[list[np.ndarray]]) -> float:
        """sum ||y - y_float||^2 / sum ||y_float||^2 over the floating-point outputs and the samples."""
        num = 0.0
        for ys, ref in zip(outputs, self.reference):
            num += sum(_squared_distance(y, r) for y, r in zip(ys, ref) if np.issubdtype(y.dtype, np.floating))
        return num / max(self.norm, 1e-30)

    def set_context(self, plans: Mapping[str, LayerPlan] | None) -> float:
        """Run the whole model with every target at its plan (None: float); later ``error`` calls change targets
        from there. Returns the context's output error."""
        self._context_feeds = {**self.float_w, **self.zero,
                               **(self._feeds(self.targets, plans) if plans is not None else {})}
        self._context_outputs, self._context_values = [], []
        names = self.whole.segment.outputs
        for sample in self.samples:
            values = dict(zip(names, self.whole.session.run(names, self._only(self.whole, {**sample,
                                                                                         **self._context_feeds}))))
            self._context_outputs.append([values[n] for n in self.outputs])
            self._context_values.append(values)
        self.runs += len(self.samples)
        return self._error(self._context_outputs) if self.reference else 0.0

    def _only(self, runner: SegmentRunner, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The feeds ``runner``'s session takes (each session holds a different part of the graph)."""
        if id(runner) not in self._input_names:
            self._input_names[id(runner)] = [i.name for i in runner.session.get_inputs()]
        return {n: feeds[n] for n in self._input_names[id(runner)]}

    def _runner(self, k: int) -> SegmentRunner:
        if k not in self._runners:
            seg = self.suffixes[k]
            arrays = {**self.samples[0], **self._context_values[0]}
            self._runners[k] = SegmentRunner(self.model, seg, {n: arrays[n] for n in seg.inputs},
                                             graph_hook=self._hook if self.quantizers else None,
                                             threads=1 if self.workers > 1 else self.threads)
        return self._runners[k]

    def error(self, changed: Sequence[Target], plans: Mapping[str, LayerPlan]) -> float:
        """Relative output error with ``changed`` at ``plans`` and every other target as in the context."""
        return self.errors([(changed, plans)])[0]

    def errors(self, jobs: Sequence[tuple[Sequence[Target], Mapping[str, LayerPlan]]]) -> list[float]:
        """``error`` for each (changed, plans), ``workers`` passes at a time. Weights are rounded and sessions
        built here, in this thread; the pool only runs onnxruntime and the error sums (both release the GIL; a
        session's input names, cached on first use, are the same whichever thread reads them first)."""
        prepared = []
        for changed, plans in jobs:
            start = min(self.depth[t.name] for t in changed)
            k = max(i for i, d in enumerate(self.cut_depths) if d <= start) if start >= self.cut_depths[0] else None
            feeds = dict(self._context_feeds)
            for t in changed:  # the changed targets' context settings go before their new ones are applied
                feeds[t.weight_name] = self.float_w[t.weight_name]
                for (node, _), name in self.switches.items():
                    if node == t.name:
                        feeds[name] = self.zero[name]
            feeds.update(self._feeds(changed, plans))
            runner = self.whole if k is None else self._runner(k)
            names = self.outputs if k is None else runner.segment.outputs
            prepared.append((runner, names, feeds))

        def one(job) -> float:
            runner, names, feeds = job
            outputs = []
            for sample, ctx_values, ctx_out in zip(self.samples, self._context_values, self._context_outputs):
                got = dict(zip(names, runner.session.run(names, self._only(runner, {**sample, **ctx_values,
                                                                                     **feeds}))))
                outputs.append([got.get(n, old) for n, old in zip(self.outputs, ctx_out)])
            return self._error(outputs)

        self.runs += len(self.samples) * len(prepared)
        if self.workers == 1 or len(prepared) == 1:
            return [one(job) for job in prepared]
        if self._pool is None:  # torch's thread count is per thread: the distances take one each
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="sensitivity",
                                            initializer=torch.set_num_threads, initargs=(1,))
        return list(self._pool.map(one, prepared))


def _squared_distance(y: np.ndarray, r: np.ndarray) -> float:
    """``sum((y - r)^2)`` accumulated in float64 without a float64 copy of the outputs (an LLM's logits are
    ~50 MB per pass)."""
    d = torch.from_numpy(np.asarray(y)) - torch.from_numpy(np.asarray(r))
    return float(torch.sum(d.square_(), dtype=torch.float64))


def _same(q: ActQuantizer, acts) -> bool:
    return q.format == acts.format and q.bits == acts.bits and q.granularity == acts.granularity \
        and q.dynamic == acts.dynamic and q.symmetric == acts.symmetric
