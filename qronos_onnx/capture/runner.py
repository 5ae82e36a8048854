"""SegmentRunner and CaptureEngine: X and X~ of every target for about one forward pass per stream.

The float stream (original weights) and the quantized stream (weights rounded so far) each keep their frontier for
all calibration batches and advance one segment per wave (see graph/schedule.py). Tensors that depend on no target
(graph inputs, masks, positions, embeddings: segment 0) are identical in both streams and are computed and kept
once. After segment w the engine folds the inputs of wave w's targets into LayerStats on the rounding device,
yields them, and waits for the rounded weights of the wave before it runs segment w + 1.

Limits: each segment is serialized without its large constants (they are handed to onnxruntime as external
initializers, read lazily from the loaded model), so models above 2 GB work; weights read by non-target nodes
see whatever the quantized stream holds when that node runs (the float weight before its own wave); activation
quantization is a hook (``act_quant`` on the statistics side, ``graph_hook`` on the quantized segment graphs).
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch
from tqdm.auto import tqdm

from ..config import CaptureConfig
from ..errors import CalibrationError, ModelError
from ..graph.model import read_initializer
from ..graph.schedule import Schedule, Segment, build_schedule
from ..graph.targets import Target
from ..threads import pinned_threads, torch_threads
from .frontier import FrontierStore
from .stats import LayerStats, StatsAccumulator, conv_input, finalize, tokens

ActQuant = Callable[[Target, np.ndarray], np.ndarray]
GraphHook = Callable[[ir.Graph, Segment], None]

_EXTERNAL_MIN_BYTES = 1024
_PLACEHOLDER = "__qronos_external_initializer__"
_NUMPY_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.INT8, ir.DataType.INT16,
                ir.DataType.INT32, ir.DataType.INT64, ir.DataType.UINT8, ir.DataType.UINT16, ir.DataType.UINT32,
                ir.DataType.UINT64, ir.DataType.BOOL}


def default_providers() -> list[str]:
    """CUDA when onnxruntime has it and a GPU is there, CPU otherwise."""
    if "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


GraphLookup = tuple[dict[str, ir.Value], dict[str, ir.Node]]


def graph_lookup(graph: ir.Graph) -> GraphLookup:
    """(values by name, nodes by name) of the main graph."""
    return value_map(graph), {node.name: node for node in graph}


def value_map(graph: ir.Graph) -> dict[str, ir.Value]:
    """name -> value for the main graph's inputs, initializers and node outputs."""
    values = {v.name: v for v in graph.inputs}
    values.update(graph.initializers)
    for node in graph:
        for v in node.outputs:
            values[v.name] = v
    return values


def build_segment_model(model: ir.Model, segment: Segment, input_arrays: Mapping[str, np.ndarray],
                        graph_hook: GraphHook | None = None, index: GraphLookup | None = None
                        ) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """A standalone model for ``segment``: frontier values and target weights as inputs, other constants kept.

    Large constants become placeholders whose data is returned separately (for
    ``SessionOptions.add_external_initializers``), so the serialized segment stays small whatever the model size.
    ``input_arrays`` gives the dtype and rank of the frontier inputs (intermediate tensors may lack type info).
    The input model is not changed: the segment is a clone of a view on its nodes. ``index`` (values and nodes
    by name) saves rebuilding the lookup for every segment of a large graph.
    """
    values, by_name = index or graph_lookup(model.graph)
    view = ir.GraphView(
        [values[n] for n in [*segment.inputs, *segment.weights]],
        [values[n] for n in segment.outputs],
        nodes=[by_name[n] for n in segment.nodes],
        initializers=[values[n] for n in segment.initializers],
        opset_imports=dict(model.graph.opset_imports),
        name=f"segment_{segment.index}",
    )
    graph = view.clone()
    for v in graph.inputs:
        v.const_value = None
        if v.name in input_arrays:  # frontier: every dim dynamic (batches and sequence lengths vary by call)
            arr = input_arrays[v.name]
            v.type = ir.TensorType(ir.DataType.from_numpy(arr.dtype))
            v.shape = ir.Shape([None] * arr.ndim)
        else:  # a target weight
            tensor = values[v.name].const_value
            assert tensor is not None
            v.type = ir.TensorType(tensor.dtype)
            v.shape = ir.Shape(tensor.shape)
    for node in graph:  # recorded shapes may hold a batch of 1; onnxruntime infers them again from the inputs
        for out in node.outputs:
            out.shape = None
    externals: dict[str, np.ndarray] = {}
    for name, v in graph.initializers.items():
        tensor = v.const_value
        if tensor is None:
            continue
        if tensor.dtype in _NUMPY_TYPES and tensor.nbytes > _EXTERNAL_MIN_BYTES:
            arr = read_initializer(values[name])
            externals[name] = arr
            v.const_value = ir.ExternalTensor(_PLACEHOLDER, 0, arr.nbytes, tensor.dtype, shape=ir.Shape(arr.shape),
                                              name=name)
        elif isinstance(tensor, ir.ExternalTensor):  # small or exotic: inline it (the proto is loaded from bytes)
            v.const_value = ir.Tensor(read_initializer(values[name]), dtype=tensor.dtype, name=name)
    if graph_hook is not None:
        graph_hook(graph, segment)
    seg_model = ir.Model(graph, ir_version=max(int(model.ir_version), 4),
                         functions=list(model.functions.values()), producer_name="qronos-onnx capture")
    return seg_model, externals


class SegmentRunner:
    """One onnxruntime session for one segment. Target weights are inputs, so it serves both streams."""

    def __init__(self, model: ir.Model, segment: Segment, input_arrays: Mapping[str, np.ndarray], *,
                 providers: Sequence[str] | None = None, threads: int | None = None,
                 graph_hook: GraphHook | None = None, index: GraphLookup | None = None):
        self.segment = segment
        seg_model, externals = build_segment_model(model, segment, input_arrays, graph_hook, index)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = pinned_threads(threads or 0)
        so.log_severity_level = 3
        # no busy-waiting between calls: torch folds the statistics on the same cores right after each call
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._keep = [ort.OrtValue.ortvalue_from_numpy(a) for a in externals.values()]  # alive as long as we are
        if externals:
            so.add_external_initializers(list(externals), self._keep)
        try:
            proto = ir.serde.serialize_model(seg_model)
            self.session = ort.InferenceSession(proto.SerializeToString(), so,
                                                providers=list(providers or default_providers()))
        except Exception as err:
            raise ModelError(f"onnxruntime cannot build capture segment {segment.index} "
                             f"({_span(segment.nodes)}): {_first_line(err)}") from None
        self._externals = externals

    def run(self, feeds: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray | ort.OrtValue]
            ) -> dict[str, np.ndarray]:
        inputs = {n: feeds[n] for n in self.segment.inputs}
        inputs.update({n: weights[n] for n in self.segment.weights})
        results = self.session.run(self.segment.outputs, inputs)
        return dict(zip(self.segment.outputs, results))


def _to_cuda(arrays: Mapping[str, np.ndarray]) -> dict[str, ort.OrtValue]:
    return {n: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), "cuda", 0) for n, a in arrays.items()}


def _span(nodes: Sequence[str]) -> str:
    return nodes[0] if len(nodes) == 1 else f"{nodes[0]} .. {nodes[-1]}" if nodes else "empty"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ------------------------------------------------------------------------------------------ calibration batches

@dataclass
class Chunk:
    """One onnxruntime call: ``feeds`` holds the graph inputs of ``n_samples`` samples (concatenated or not)."""

    feeds: dict[str, np.ndarray]
    owned: set[str]  # names whose array was built here (concatenated), not borrowed from the caller
    n_samples: int


def _batch_axis_inputs(names: Sequence[str], inputs: Mapping[str, ir.Value]) -> set[str]:
    """Inputs whose axis 0 is one symbolic batch dimension that appears nowhere else (empty: no batching)."""
    first: dict[str, str] = {}
    elsewhere: set[str] = set()
    for n in names:
        shape = inputs[n].shape
        if shape is None or len(shape) == 0:
            continue
        dims = list(shape)
        if isinstance(dims[0], ir.SymbolicDim) and dims[0].value:
            first[n] = dims[0].value
        elsewhere.update(d.value for d in dims[1:] if isinstance(d, ir.SymbolicDim) and d.value)
    batched = {n: s for n, s in first.items() if s not in elsewhere}
    return set(batched) if len(set(batched.values())) == 1 else set()


def make_chunks(samples: Sequence[Mapping[str, np.ndarray]], names: Sequence[str],
                inputs: Mapping[str, ir.Value], batch_size: int) -> list[Chunk]:
    """Group samples into onnxruntime calls of up to ``batch_size`` samples when axis 0 is a batch axis.

    Inputs without a batch axis (an [S, S] mask) must then be equal in all samples of a call. Samples whose
    shapes differ are never concatenated. The caller's arrays are only read.
    """
    checked: list[dict[str, np.ndarray]] = []
    for i, sample in enumerate(samples):
        if not isinstance(sample, Mapping):
            raise CalibrationError(f"calibration sample {i} is a {type(sample).__name__}, expected a dict of "
                                   "input name -> array")
        feeds = {}
        for n in names:
            if n not in sample:
                raise CalibrationError(f"calibration sample {i} has no input {n!r}; the model needs "
                                       f"{', '.join(names)}")
            arr = np.asarray(sample[n])
            want = inputs[n].dtype
            if want is not None and want in _NUMPY_TYPES and arr.dtype != want.numpy():
                raise CalibrationError(f"calibration sample {i}: input {n!r} has dtype {arr.dtype}, the model "
                                       f"expects {want.numpy()}")
            feeds[n] = arr
        checked.append(feeds)
    batched = _batch_axis_inputs(names, inputs) if batch_size > 1 else set()
    if not batched:
        return [Chunk(f, set(), 1) for f in checked]

    def fits(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
        for n in names:
            x, y = a[n], b[n]
            if x.dtype != y.dtype:
                return False
            if n in batched:
                if x.ndim == 0 or x.shape[1:] != y.shape[1:]:
                    return False
            elif x.shape != y.shape or not np.array_equal(x, y):
                return False
        return True

    groups: list[list[dict[str, np.ndarray]]] = []
    for feeds in checked:
        if groups and len(groups[-1]) < batch_size and fits(groups[-1][0], feeds):
            groups[-1].append(feeds)
        else:
            groups.append([feeds])
    chunks = []
    for g in groups:
        if len(g) == 1:
            chunks.append(Chunk(g[0], set(), 1))
            continue
        feeds = {n: (np.concatenate([s[n] for s in g], axis=0) if n in batched else g[0][n]) for n in names}
        chunks.append(Chunk(feeds, set(batched), len(g)))
    return chunks


# ------------------------------------------------------------------------------------------------- the engine

@dataclass
class KeptInputs:
    """Debug copy of a target's raw inputs, one array per onnxruntime call (``keep_inputs=True``; tests only)."""

    x_tilde: list[np.ndarray] = field(default_factory=list)  # quantized stream, after act_quant
    x: list[np.ndarray] = field(default_factory=list)  # float reference


class CaptureEngine:
    """Two streams through the segments of ``build_schedule``; yields the LayerStats of every wave.

    Usage::

        with CaptureEngine(model, targets, samples, cfg) as engine:
            for wave_targets, stats in engine.waves():          # stats: weight name -> LayerStats
                engine.set_weights({name: dequantized_weight})   # every weight of the wave, ONNX layout

    ``act_quant(target, x)`` is applied to the quantized stream's input of each target before its statistics
    (activation quantizers are per input tensor: targets sharing an input share one call). ``graph_hook(graph,
    segment)`` may edit the quantized stream's copy of every segment graph after segment 0 (e.g. insert Q/DQ in
    front of targets); with a hook the two streams use separate sessions.
    """

    def __init__(self, model: ir.Model, targets: list[Target], samples: Sequence[Mapping[str, np.ndarray]],
                 cfg: CaptureConfig, *, device: str | torch.device = "cpu", stats_dtype: torch.dtype = torch.float32,
                 act_quant: ActQuant | None = None, quiet: bool = False, keep_inputs: bool = False,
                 graph_hook: GraphHook | None = None, providers: Sequence[str] | None = None,
                 tmp_dir: str | os.PathLike | None = None, dist=None):
        cfg.validate()
        self.model, self.targets, self.cfg = model, list(targets), cfg
        self.schedule: Schedule = build_schedule(model, self.targets)
        self.device, self.stats_dtype = torch.device(device), stats_dtype
        self.act_quant, self.graph_hook, self.quiet, self.keep_inputs = act_quant, graph_hook, quiet, keep_inputs
        self.providers = list(providers or default_providers())
        samples = list(samples)
        if cfg.samples is not None:
            samples = samples[: cfg.samples]
        if not samples:
            raise CalibrationError("no calibration samples were given")
        self._index = graph_lookup(model.graph)
        self._values = self._index[0]
        self._chunks = make_chunks(samples, self.schedule.graph_inputs, self._values, cfg.batch_size)
        # dist.Distributed: this rank runs its contiguous block of the chunks a single process would make, and the
        # statistics are summed over ranks in chunk order (dist.py); chunk numbers stay global
        self.dist = dist
        self._mine = dist.shard(len(self._chunks)) if dist is not None else range(len(self._chunks))
        self.n_samples = len(samples)
        self._store = FrontierStore(cfg.max_memory, tmp_dir)
        self._target_of_weight = {t.weight_name: t for t in self.targets}
        self._dying: dict[int, list[str]] = {}  # step -> tensors read for the last time in it
        for name, last in self.schedule.last_use.items():
            self._dying.setdefault(last, []).append(name)
        self._quant_w: dict[str, np.ndarray] = {}
        self._restore = None  # checkpoint.EngineState to continue from (resume_from)
        self._pending: set[str] | None = None
        self._wave_weights: set[str] = set()
        self._wave = -1
        self._started = self._closed = False
        self.node_executions = {"shared": 0, "float": 0, "quant": 0}
        self.seconds = {"build": 0.0, "ort": 0.0, "stats": 0.0}
        self.kept_inputs: dict[str, KeptInputs] = {}

    # -- lifetime
    def __enter__(self) -> "CaptureEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Free the frontier and delete its temporary files (idempotent)."""
        self._closed = True
        self._store.close()
        self._quant_w.clear()

    @property
    def n_calls(self) -> int:
        """onnxruntime calls per segment and stream (calibration batches)."""
        return len(self._chunks)

    @property
    def forward_pass_nodes(self) -> int:
        """Node executions of one plain forward pass of the whole graph over the calibration set."""
        return self.schedule.node_count * len(self._chunks)

    @property
    def wave(self) -> int:
        """Index (in ``schedule.waves``) of the wave being yielded or last completed; -1 before the first."""
        return self._wave

    @property
    def tmp_dir(self):
        return self._store.tmp_dir

    @property
    def frontier(self) -> FrontierStore:
        return self._store

    # -- the loop
    def waves(self) -> Iterator[tuple[list[Target], dict[str, LayerStats]]]:
        """Run segment by segment; after each, yield the wave's targets and their statistics."""
        if self._started or self._closed:
            raise RuntimeError("CaptureEngine.waves() can be iterated only once, inside its `with` block")
        self._started = True
        sched = self.schedule
        bar = tqdm(total=len(sched.segments), desc="capture", unit="wave", disable=self.quiet, leave=False)
        start = 0
        try:
            if self._restore is not None:
                start = self._restore_state()
                bar.update(start)
            else:
                for c in self._mine:
                    chunk = self._chunks[c]
                    for n, arr in chunk.feeds.items():
                        if n in chunk.owned:
                            self._store.put(("shared", n, c), arr)
                        else:
                            self._store.borrow(("shared", n, c), arr)
            self._chunks = [Chunk({}, set(), ch.n_samples) for ch in self._chunks]  # the store holds them now
            for w in range(start, len(sched.waves)):
                wave = sched.waves[w]
                self._wave = w
                names = [t.name for t in wave]
                bar.set_postfix_str(", ".join(names[:3]) + (f" +{len(names) - 3}" if len(names) > 3 else ""))
                stats = self._step(w)
                if wave:
                    self._wave_weights = set(stats)
                    self._pending = set(stats)
                    yield list(wave), stats
                    if self._pending:
                        raise RuntimeError(f"set_weights() was not called for {', '.join(sorted(self._pending))} "
                                           f"in wave {w}")
                    self._pending = None
                del stats
                bar.update(1)
        finally:
            self._pending = None
            bar.close()
            if not self._closed:
                self._store.close()

    # -- checkpoints (see checkpoint.py)
    def resume_from(self, state) -> None:
        """Continue after wave ``state.wave`` of an earlier run: call before iterating ``waves()``.

        ``state`` (a checkpoint.EngineState) gives the frontier after that wave and the rounded weights later
        segments still compute with; ``waves()`` then starts at the next wave.
        """
        if self._started:
            raise RuntimeError("resume_from() must be called before waves()")
        if not -1 <= state.wave < len(self.schedule.waves):
            raise ValueError(f"cannot resume after wave {state.wave}: the schedule has {len(self.schedule.waves)}")
        self._restore = state

    def _restore_state(self) -> int:
        state, self._restore = self._restore, None
        for key, serial, arr in state.frontier():
            if arr is None:  # borrowed from the calibration chunks, rebuilt from the same calibration data
                stream, name, c = key
                self._store.borrow(key, self._chunks[c].feeds[name])
            else:
                self._store.put(key, arr, serial=serial)
        self._store.next_serial = max(self._store.next_serial, state.next_serial)
        self._quant_w = {n: np.asarray(a) for n, a in state.quant_w().items()}
        self._wave = state.wave
        return state.wave + 1

    def kept_weights(self) -> dict[str, np.ndarray]:
        """Rounded weights that later segments still compute with (part of the state a checkpoint keeps)."""
        return dict(self._quant_w)

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """The quantized stream's weights for this wave: ONNX layout, cast to the model dtype, copied."""
        if self._pending is None:
            raise RuntimeError("set_weights() is only valid inside the loop over engine.waves()")
        for name, arr in weights.items():
            if name not in self._wave_weights:
                raise ValueError(f"weight {name!r} is not rounded in wave {self._wave}; this wave rounds "
                                 f"{', '.join(sorted(self._wave_weights))}")
            t = self._target_of_weight[name]
            arr = np.asarray(arr)
            if tuple(arr.shape) != tuple(t.weight_shape):
                raise ValueError(f"weight {name!r}: got shape {tuple(arr.shape)}, expected {t.weight_shape}")
            if self.schedule.weight_last_use.get(name, -1) > self._wave:  # some later segment computes with it
                self._quant_w[name] = np.array(arr, dtype=t.weight_dtype, copy=True)
            self._pending.discard(name)

    # -- one step: run segment w on both streams, fold wave w into statistics
    def _step(self, w: int) -> dict[str, LayerStats]:
        sched, store = self.schedule, self._store
        seg, wave = sched.segments[w], sched.waves[w]
        local = self.cfg.reference == "local"
        groups: dict[tuple, list[Target]] = {}
        for t in wave:
            groups.setdefault((t.input_name, t.conv), []).append(t)
        hold = self.dist is not None and self.dist.rank > 0  # partials wait for the sums of the ranks before
        accs = {key: StatsAccumulator(ts[0].groups, ts[0].in_features, self.device, self.stats_dtype, hold=hold)
                for key, ts in groups.items()}
        if self.keep_inputs:
            for t in wave:
                self.kept_inputs[t.name] = KeptInputs()
        runner_q = runner_f = None
        w_float = {n: read_initializer(self._values[n]) for n in seg.weights}
        w_quant = {n: self._quant_w.get(n, w_float[n]) for n in seg.weights}
        if self.providers[0] == "CUDAExecutionProvider":  # upload the weights once per step, not once per call
            w_float, w_quant = _to_cuda(w_float), _to_cuda(w_quant)
        f_stream = "quant" if local else "float"
        dying = self._dying.get(w, [])
        for c in self._mine:
            q_out: dict[str, np.ndarray] = {}
            f_out: dict[str, np.ndarray] = {}
            if not seg.empty:
                q_in = {n: self._get("quant", n, c) for n in seg.inputs}
                if runner_q is None:
                    tic = time.perf_counter()
                    runner_q = self._runner(seg, q_in, self.graph_hook if w > 0 else None)
                    runner_f = runner_q if (self.graph_hook is None or w == 0) else self._runner(seg, q_in, None)
                    self.seconds["build"] += time.perf_counter() - tic
                tic = time.perf_counter()
                q_out = self._run(runner_q, q_in, w_quant, c)
                if w == 0:
                    f_out = q_out
                    self.node_executions["shared"] += len(seg.nodes)
                else:
                    f_in = q_in if local else {n: self._get("float", n, c) for n in seg.inputs}
                    f_out = self._run(runner_f, f_in, w_float, c)
                    self.node_executions["quant"] += len(seg.nodes)
                    self.node_executions["float"] += len(seg.nodes)
                self.seconds["ort"] += time.perf_counter() - tic
            tic = time.perf_counter()
            for key, ts in groups.items():
                name = key[0]
                xq = q_out[name] if name in q_out else self._get("quant", name, c)
                xf = f_out[name] if name in f_out else self._get(f_stream, name, c)
                same = xq is xf and self.act_quant is None
                if self.act_quant is not None:
                    view = xq.view()
                    view.flags.writeable = False
                    xq = np.asarray(self.act_quant(ts[0], view))
                    if xq.shape != xf.shape:
                        raise ValueError(f"act_quant changed the shape of {name!r}: {xf.shape} -> {xq.shape}")
                if ts[0].op_type == "Conv":  # im2col piece by piece inside add (StatsAccumulator.add_conv)
                    tq = conv_input(xq, ts[0], self.device, self.stats_dtype)
                    tf = tq if same else conv_input(xf, ts[0], self.device, self.stats_dtype)
                    accs[key].add(tq, tf, same=same, conv=ts[0].conv)
                else:
                    with torch_threads(1):  # reshapes and token copies: memory-bound (threads.py)
                        tq = tokens(xq, ts[0], self.device, self.stats_dtype)
                        tf = tq if same else tokens(xf, ts[0], self.device, self.stats_dtype)
                    accs[key].add(tq, tf, same=same)  # GEMMs on the run's pinned threads (threads.py)
                if self.keep_inputs:
                    for t in ts:
                        self.kept_inputs[t.name].x_tilde.append(np.array(xq))
                        self.kept_inputs[t.name].x.append(np.array(xf))
            self.seconds["stats"] += time.perf_counter() - tic
            for name in seg.outputs:
                if sched.last_use[name] > w:
                    if w == 0:
                        store.put(("shared", name, c), q_out[name])
                    else:
                        store.put(("quant", name, c), q_out[name])
                        if not local:
                            store.put(("float", name, c), f_out[name])
            del q_out, f_out
            for name in dying:
                for stream in ("shared", "quant", "float"):
                    store.drop((stream, name, c))
        for name in [n for n in self._quant_w if sched.weight_last_use.get(n, -1) <= w]:
            del self._quant_w[name]
        if self.dist is not None:
            self._reduce(accs)
        with torch_threads(1):  # divisions of N x N sums: elementwise
            return self._finalize(wave, groups, accs)

    def _reduce(self, accs: dict[tuple, StatsAccumulator]) -> None:
        """Every rank's sums become the sums over all chunks, added in chunk order (dist.Distributed.ordered_sum)."""
        for acc in accs.values():  # the same keys in the same order on every rank (the wave's targets)
            (acc.H, acc.G, acc.F), acc.n = self.dist.ordered_sum(acc.held, [acc.H, acc.G, acc.F], acc.n)
            acc.held = []

    def _finalize(self, wave: list[Target], groups: dict[tuple, list[Target]],
                  accs: dict[tuple, StatsAccumulator]) -> dict[str, LayerStats]:
        """weight name -> LayerStats; one object per distinct input (q/k/v share theirs)."""
        keys_of: dict[str, list[tuple]] = {}
        for key, ts in groups.items():
            for t in ts:
                if key not in keys_of.setdefault(t.weight_name, []):
                    keys_of[t.weight_name].append(key)
        multi = {tuple(keys) for keys in keys_of.values() if len(keys) > 1}
        cache: dict[tuple, LayerStats] = {keys: finalize([accs[k] for k in keys]) for keys in multi}
        still_read = {k for keys in multi for k in keys}
        out = {}
        for weight in [t.weight_name for t in wave]:
            keys = tuple(keys_of[weight])
            if keys not in cache:
                cache[keys] = finalize([accs[keys[0]]], inplace=keys[0] not in still_read)
            out[weight] = cache[keys]
        return out

    def _get(self, stream: str, name: str, c: int) -> np.ndarray:
        key = ("shared" if name in self.schedule.shared_values else stream, name, c)
        return self._store.get(key)

    def _runner(self, seg: Segment, example: Mapping[str, np.ndarray], hook: GraphHook | None) -> SegmentRunner:
        return SegmentRunner(self.model, seg, example, providers=self.providers, graph_hook=hook, index=self._index,
                             threads=self.cfg.threads)

    def _run(self, runner: SegmentRunner, feeds: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray],
             c: int) -> dict[str, np.ndarray]:
        try:
            return runner.run(feeds, weights)
        except Exception as err:
            seg = runner.segment
            hint = ""
            if self._chunks[c].n_samples > 1:
                hint = (f" (this call concatenates {self._chunks[c].n_samples} samples along axis 0; if the model "
                        "has a fixed batch size, use capture.batch_size=1)")
            raise CalibrationError(f"onnxruntime failed in capture segment {seg.index} ({_span(seg.nodes)}): "
                                   f"{_first_line(err)}{hint}") from None
