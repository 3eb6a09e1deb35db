"""Faster ExecuTorch lowering for the graphs edgectl exports, with the same result.

1. `fast_passes()`: skip XNNPACK preprocess passes that cannot match anything in a partition,
   and the whole-partition re-trace of those that found nothing to change
   (`_skip_idle_retraces`); decompose once, not three times, when every preserved node
   passes XNNPACK's filter (`_edge_manager`); run the aten-to-edge local rewrites in two
   re-traces instead of eight (`FUSED_EDGE_RUNS`); make the partitioner's bookkeeping
   cheaper (signature maps built once, dependencies as bitsets, cycle test as one mask
   test); share XNNPACK's per-partition preprocess with a forked process; and cut the
   partitions out with one topological sort in place each and one recompile.
2. `infer_view_dims`: views with one symbolic size get -1, so XNNPACK delegates them.
3. `shape_kernels()`: shape-only (Meta) kernels for torchao's quantize/dequantize/choose_qparams
   ops, and shape-only fake-tensor answers for aten.linear.
4. `delegate_modules_cached()`: a delegate call's fake-tensor output comes from its
   partition's program, rebuilt as a module once, not at every re-trace, and run once per
   distinct input shape.

XNNPACK's preprocess runs 17 graph passes over every partition, and each one re-traces the
partition with fake tensors even when it has nothing to rewrite (batch norm, conv1d,
PReLU, upsample, max-pool, pad, concatenation, ...). On SmolLM2-135M that re-tracing is
most of the export time. `fast_passes()` drops, per partition, each pass whose anchor
operators do not occur in it; every other pass runs as before and in the same order.

torchao registers its quantization primitives as custom ops with no shape function, so
every time a graph is re-traced with fake tensors (decompositions, then each XNNPACK pass,
for every quantized linear) the whole Python implementation runs op by op on fake tensors:
a third of an 8da4w export. `shape_kernels()` gives them Meta kernels that compute only the
output shapes and dtypes, following torchao 0.18's own code.

All are checked, not assumed: tests/lower/test_export_run.py exports with and without them and
requires byte-identical programs once debug handles are held equal (the single
decomposition renumbers those profiling ids; nothing else changes). `EDGECTL_SLOW_EXPORT=1`
turns them off.

They patch private attributes of torch, ExecuTorch and torchao, so they are fenced: they
apply only on the versions they were written against and checked on (`WRITTEN_FOR`). On
any other version export takes ExecuTorch's stock path, with one notice (`enabled()`).
`infer_view_dims` and `dedupe` are ordinary graph passes on public torch.fx API and always
run: they change the program (more of it delegated, duplicates merged), not how it is made.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys

# The versions these patches were written against and tested on (the project's pins).
WRITTEN_FOR = {"torch": "2.13.0", "executorch": "1.4.1", "torchao": "0.18.0"}


@functools.lru_cache(maxsize=1)
def version_mismatch() -> str | None:
    """None when the installed torch/executorch/torchao are the ones in WRITTEN_FOR (a
    local build tag such as torch's "+cpu" aside), else what differs."""
    import importlib.metadata as md

    found = {}
    for name in WRITTEN_FOR:
        try:
            found[name] = md.version(name).split("+")[0]
        except md.PackageNotFoundError:
            found[name] = "not installed"
    diff = [f"{n} {found[n]} (written for {v})" for n, v in WRITTEN_FOR.items() if found[n] != v]
    return ", ".join(diff) or None


_noticed: list[str] = []


def enabled() -> bool:
    """Whether the lowering speed-ups apply: not with EDGECTL_SLOW_EXPORT=1, and only on
    the exact versions they were written for (one notice on stderr per process if not)."""
    if os.environ.get("EDGECTL_SLOW_EXPORT") == "1":
        return False
    why = version_mismatch()
    if why is not None:
        if not _noticed:
            _noticed.append(why)
            print(f"edgectl: note: ExecuTorch's stock lowering path (slower): edgectl's lowering speed-ups "
                  f"patch private internals and were written for other versions: {why}", file=sys.stderr)
        return False
    return True

# pass class name -> substrings of operator names; the pass runs only if one occurs.
# Anchors read from executorch 1.4.1's backends/xnnpack/_passes (and the transforms they import).
ANCHORS = {
    "XNNPACKRemoveCloneOpsTransform": ("clone",),
    "DimOrderOpsRevertPass": ("dim_order",),
    "ConvertToUpsampleBilinear2d": ("upsample", "_unsafe_index"),
    "ConvertToSDPAPass": ("softmax",),
    "FuseBatchNormPass": ("batch_norm",),
    "DecomposeBatchNorm": ("batch_norm",),
    "FuseActivationPass": ("relu", "hardtanh"),
    "DecomposeConcatenate": ("aten.cat",),
    "RemoveGetItemPass": ("max_pool2d_with_indices", "aten.max.dim"),
    "InsertPadQDQPass": ("constant_pad_nd",),
    "Conv1dUnsqueezePass": ("convolution",),
    "PReLUReshapePass": ("prelu",),
    "RemoveRedundantCopyPass": ("_to_copy",),
}


def _op_names(ep) -> set[str]:
    return {str(getattr(n.target, "__name__", n.target)) for n in ep.graph_module.graph.nodes if n.op == "call_function"}


def needed(passes: list, ep) -> list:
    ops = " ".join(sorted(_op_names(ep)))
    keep = [p for p in passes if p.__name__ not in ANCHORS or any(a in ops for a in ANCHORS[p.__name__])]
    return [p for p in keep if p.__name__ != "ConstPropPass" or _foldable(ep)]


def _foldable(ep) -> bool:
    """Whether executorch's ConstPropPass (as XNNPACK runs it: propogate_quant off) would
    fold anything: it evaluates an operator, other than a quantize/dequantize_per_tensor or
    _per_channel, whose arguments hold no graph value but constants, i.e. no input
    other than get_attr nodes (placeholders, parameters included, reach it as fake
    tensors and are never folded). Otherwise its whole-partition re-trace changes nothing."""
    from torch.fx.node import map_arg

    for node in ep.graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        name = str(getattr(node.target, "__name__", node.target))
        if "quantized_decomposed" in str(node.target) and name.split(".")[0] in (
                "quantize_per_tensor", "dequantize_per_tensor", "quantize_per_channel", "dequantize_per_channel"):
            continue
        inputs = []
        map_arg((node.args, node.kwargs), inputs.append)
        if all(n.op == "get_attr" for n in inputs):
            return True
    return False


# aten-to-edge passes that are local rewrites (they override only `call_operator`, and
# ScalarToTensorPass a bookkeeping `call`), in the order executorch runs them. Each
# re-traces the whole graph with fake tensors; run back to back, they can share one
# re-trace. Python's method resolution order does it: in a class deriving from
# (A, B, C), A.call_operator's `super().call_operator(...)` is B's, then C's, then
# ExportPass's, which emits the node, so every operator goes through A, then B, then C,
# as it would in three re-traces. An operator a pass inserts (`self.call_operator`)
# starts at A, where a later pass of the same run would also have met it.
FUSED_EDGE_RUNS = (
    ("NormalizeTransposePass", "ReplaceBrokenOpsWithFunctionalOpsPass", "ScalarToTensorPass", "SymToTensorPass"),
    ("RemoveMixedTypeOperators", "OpReplacePass", "MemoryFormatOpsPass"),
)
LOCAL_REWRITE_ATTRS = {"call_operator", "__init__", "__doc__", "__module__", "__qualname__", "__dict__",
                       "__weakref__", "__annotations__", "__parameters__", "__orig_bases__", "__abstractmethods__",
                       "_abc_impl"}


def _local_rewrite(cls) -> bool:
    extra = set(vars(cls)) - LOCAL_REWRITE_ATTRS
    return extra <= ({"call"} if cls.__name__ == "ScalarToTensorPass" else set())


def _fused(classes: tuple):
    from executorch.exir.pass_base import ExportPass

    if not all(issubclass(c, ExportPass) and _local_rewrite(c) for c in classes):
        return None  # a pass that is more than a local rewrite: leave them separate
    return type("+".join(c.__name__ for c in classes), classes, {})()


def _fuse_edge_passes(P, config) -> tuple[list, list, dict]:
    """(pre, post, patches) for `_generate_edge_program`: executorch's aten-to-edge passes
    with each FUSED_EDGE_RUNS run as one pass. The last run ends with the two passes that
    `_generate_edge_program` appends itself, so `patches` turns those into no-ops there."""
    pre, post = P._get_aten_to_edge_passes(config)
    # executorch wraps each pass (torch's pass_result_wrapper, which keeps it as __wrapped__)
    pre, patches = [getattr(p, "__wrapped__", p) for p in pre], {}
    tail = [P.OpReplacePass] + ([] if config._skip_dim_order else [P.MemoryFormatOpsPass])
    for run in FUSED_EDGE_RUNS:
        names = [type(p).__name__ for p in pre]
        head = [n for n in run if n in names]
        rest = run[len(head):]
        if not head or names[names.index(head[0]):names.index(head[0]) + len(head)] != head:
            continue
        i = names.index(head[0])
        appended = [c for c in tail if c.__name__ in rest]
        if rest and (i + len(head) != len(pre) or [c.__name__ for c in appended] != list(rest)):
            continue  # the appended passes do not follow directly: keep the original order
        fused = _fused(tuple(type(p) for p in pre[i:i + len(head)]) + tuple(appended))
        if fused is None:
            continue
        if run is FUSED_EDGE_RUNS[0] and i == 1 and names[0] == "ReplaceSymSizeOpPass":
            # `_generate_edge_program` runs ReplaceViewOpsWithViewCopyOpsPass (torch's, on
            # the deprecated pass base) just before these; it rewrites only view ops, and
            # ReplaceSymSizeOpPass only sym_size, so it joins this run as an ExportPass.
            with_views = _fused((_view_copy_pass(),) + tuple(type(p) for p in pre[i:i + len(head)]) + tuple(appended))
            if with_views is not None:
                fused = with_views
                patches["ReplaceViewOpsWithViewCopyOpsPass"] = _Identity
        pre[i:i + len(head)] = [fused]
        patches.update({c.__name__: _Identity for c in appended})
    return pre, post, patches


def _view_copy_pass():
    """torch's ReplaceViewOpsWithViewCopyOpsPass as a local rewrite on ExportPass: a view
    op becomes its view_copy variant (and _unsafe_view a view_copy), by torch's own map."""
    from executorch.exir.pass_base import ExportPass
    from torch._export.passes import replace_view_ops_with_view_copy_ops_pass as V
    from torch._ops import OpOverload

    class ViewCopyOps(ExportPass):
        def call_operator(self, op, args, kwargs, meta):
            if op in V._NON_FUNCTIONAL_OPS_TO_FUNCTIONAL_OPS:
                op = V._NON_FUNCTIONAL_OPS_TO_FUNCTIONAL_OPS[op]
            elif isinstance(op, OpOverload) and (view_copy := V.get_view_copy_of_view_op(op._schema)):
                op = view_copy
            return super().call_operator(op, args, kwargs, meta)

    return ViewCopyOps


class _Identity:
    def __call__(self, gm):
        from torch.fx.passes.infra.pass_base import PassResult

        return PassResult(gm, False)


def _edge_manager(original, partitioner, aten_programs, config, constant_methods, generate_etrecord=False):
    """executorch's `_gen_edge_manager_for_partitioners` for one program and one partitioner
    with a node filter (XNNPACK), in one decomposition instead of three. The original first
    functionalizes ({} table), then decomposes everything but the partitioner's preserved
    ops, then marks the preserved nodes that pass the partitioner's filter and decomposes
    again so that those failing it are decomposed too. Decomposing directly functionalizes
    as well; and when every preserved node passes the filter, the third pass has nothing
    left to decompose, so it is skipped. Any other case runs the original."""
    from executorch.exir.program import _program as P

    (name, program), = aten_programs.items()
    parts = (partitioner or {}).get(name, [])
    if generate_etrecord or len(parts) != 1:
        return original(partitioner, aten_programs, config, constant_methods, generate_etrecord)
    ops, check = parts[0].ops_to_not_decompose(program)
    if check is None:
        return original(partitioner, aten_programs, config, constant_methods, generate_etrecord)
    ops = P._remove_invalid_ops_for_not_decompose(ops)
    table = P._default_decomposition_table()
    for op in ops:
        table.pop(op, None)
    decomposed = program.run_decompositions(table)
    _, check = parts[0].ops_to_not_decompose(decomposed)
    kept = [n for n in decomposed.graph.nodes if n.op == "call_function" and n.target in ops]
    if P.get_control_flow_submodules(decomposed.graph_module) or not all(check(n) for n in kept):
        return original(partitioner, aten_programs, config, constant_methods, generate_etrecord)
    preserved = list({n.target for n in kept})
    aten_to_edge = P._get_aten_to_edge_passes
    pre, post, patches = _fuse_edge_passes(P, config)
    saved = {attr: getattr(P, attr) for attr in patches}
    P._get_aten_to_edge_passes = lambda c: (pre, post)
    for attr, stub in patches.items():
        setattr(P, attr, stub)
    try:
        edge = P._generate_edge_program(config, decomposed, preserve_ops=preserved)
    finally:
        P._get_aten_to_edge_passes = aten_to_edge
        for attr, kept in saved.items():
            setattr(P, attr, kept)
    config._core_aten_ops_exception_list = list(set(config._core_aten_ops_exception_list) | set(preserved))
    return P.EdgeProgramManager({name: edge}, constant_methods, config, preserved)


def _fingerprint(gm) -> str:
    from torch.fx.node import map_arg

    return repr([(n.name, n.op, str(n.target), map_arg((n.args, n.kwargs), lambda a: a.name))
                 for n in gm.graph.nodes])


def _rewrites_only_in_call(p) -> bool:
    """A pass whose only ExportPass override is `call` (it edits the graph directly, then
    has ExportPass re-trace it), so the re-trace itself changes nothing of its own."""
    from executorch.exir.pass_base import ExportPass

    if not isinstance(p, ExportPass) or type(p).call is ExportPass.call:
        return False
    for cls in type(p).__mro__:
        if cls is ExportPass:
            return True
        if any(not a.startswith("__") and a not in ("call", "_abc_impl") and hasattr(ExportPass, a) for a in vars(cls)):
            return False
    return False


@contextlib.contextmanager
def _skip_idle_retraces():
    """Most of XNNPACK's preprocess passes (ConvertToLinearPass, ConvertToSDPAPass,
    DecomposeConcatenate, ChannelsLastTaggedReshapePass, PropagateCustomMetaPass, ...)
    look for their pattern, edit the graph, and then re-trace the whole partition with fake
    tensors (`super().call(graph_module)`), whether or not they found anything. Where the
    graph is node for node what it was when the pass began, that re-trace would rebuild
    it as it is: skip it and hand on the graph (meta edits made in place stay)."""
    from executorch.exir.pass_base import ExportPass
    from torch.fx.passes.infra.pass_base import PassBase, PassResult

    enter, retrace = PassBase.__call__, ExportPass.call

    def __call__(self, gm):
        if _rewrites_only_in_call(self):
            self._edgectl_entry = _fingerprint(gm)
        return enter(self, gm)

    def call(self, gm):
        before = self.__dict__.pop("_edgectl_entry", None)
        if before is not None and _fingerprint(gm) == before:
            return PassResult(gm, True)
        return retrace(self, gm)

    PassBase.__call__, ExportPass.call = __call__, call
    try:
        yield
    finally:
        PassBase.__call__, ExportPass.call = enter, retrace


@contextlib.contextmanager
def delegate_modules_cached():
    """Every re-trace of a graph that holds delegate calls (XNNPACK's partitions, already
    lowered) asks each call for its output on fake tensors, which torch answers by running
    the partition's original program (`call_delegate_cpu`): `original_module.module()`
    rebuilds that program as a fresh module each time (unlift, recompile), then runs it.
    This is the same function, with each module built once; and a call on fake tensors
    whose program, shape env and input shapes, strides and dtypes were seen before gets
    fresh fake outputs of the shapes that call produced, without running the program."""
    if not enabled():
        yield
        return
    import importlib

    import torch.utils._pytree as pytree
    from torch.fx.immutable_collections import immutable_dict, immutable_list

    # the module, not the operator of the same name that torch._higher_order_ops exports
    D = importlib.import_module("torch._higher_order_ops.executorch_call_delegate")
    original = D.call_delegate_cpu
    built: dict = {}
    shapes: dict = {}

    def call_delegate_cpu(lowered_module, *args):
        ep = lowered_module.original_module
        if id(ep) not in built:
            built[id(ep)] = (ep, ep.module())  # holds ep: its id stays unique
        args = pytree.tree_map_only((immutable_dict, immutable_list),
                                    lambda a: dict(a) if isinstance(a, immutable_dict) else list(a), args,
                                    lambda a: isinstance(a, (immutable_dict, immutable_list)))
        keyed = _fake_call_key(id(ep), args)
        if keyed is None:
            return built[id(ep)][1](*args)
        key, env = keyed
        if key not in shapes:
            out = built[id(ep)][1](*args)
            shapes[key] = (_metas(out), env)  # holds the shape env: its id stays unique
            return out
        return _from_metas(shapes[key][0])

    D.call_delegate_cpu = call_delegate_cpu
    try:
        yield
    finally:
        D.call_delegate_cpu = original


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _preprocess_forked(original):
    """XnnpackBackend.preprocess_multimethod with the partitions shared between this process
    and one forked child: each partition's preprocess (17 passes, then serialization) is
    independent of the others and reads only its own copy of its program, so half of them
    run in the child, whose results (bytes and named data, picklable) come back through a
    pipe in the original order. With fewer than two cores or partitions, no fork: the
    original. A child that fails is reported, and its share run here instead."""

    def preprocess_multimethod(cls, edge_programs, compile_specs):
        import pickle
        import sys

        jobs = [(m, i) for m, programs in edge_programs.items() for i in range(len(programs))]
        if len(jobs) < 2 or _usable_cores() < 2 or not hasattr(os, "fork"):
            return original.__func__(cls, edge_programs, compile_specs)
        size = {j: len(edge_programs[j[0]][j[1]].graph.nodes) for j in jobs}
        ordered = sorted(jobs, key=lambda j: -size[j])
        theirs = set(ordered[1::2])
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: its share, pickled into the pipe, then gone
            code = 0
            try:
                import torch

                os.close(r)
                torch.set_num_threads(1)
                try:
                    out = ("ok", {j: cls.preprocess(edge_programs[j[0]][j[1]], compile_specs[j[0]][j[1]]) for j in theirs})
                except BaseException as e:  # noqa: BLE001 - reported to the parent
                    out = ("error", f"{type(e).__name__}: {e}")
                with os.fdopen(w, "wb") as f:
                    pickle.dump(out, f, protocol=pickle.HIGHEST_PROTOCOL)
            except BaseException:  # noqa: BLE001
                code = 1
            finally:
                os._exit(code)
        os.close(w)
        results = {}
        try:
            for j in jobs:
                if j not in theirs:
                    results[j] = cls.preprocess(edge_programs[j[0]][j[1]], compile_specs[j[0]][j[1]])
            with os.fdopen(r, "rb") as f:
                try:
                    status, payload = pickle.load(f)
                except EOFError:
                    status, payload = "error", "the child exited without a result"
        finally:
            _, rc = os.waitpid(pid, 0)
        if status != "ok":
            print(f"note: preprocessing in a second process failed ({payload}); finishing here", file=sys.stderr)
            payload = {j: cls.preprocess(edge_programs[j[0]][j[1]], compile_specs[j[0]][j[1]]) for j in theirs}
        results.update(payload)
        return {m: [results[(m, i)] for i in range(len(programs))] for m, programs in edge_programs.items()}

    return classmethod(preprocess_multimethod)


@contextlib.contextmanager
def _partitions_sorted_in_place():
    """Cutting out each of the partitions (executorch's create_submodule_from_nodes) ends
    with torch's `legalize_graph`: a topological sort that copies every node of the whole
    graph into a new one, which then regenerates the graph module's Python code, once per
    partition. This sorts in the same order (the same algorithm, on the same nodes) by
    moving the nodes where they are, and regenerates the code once, after the last
    partition (`_create_partitions`); nothing in between runs that code."""
    import collections

    import executorch.exir.lowered_backend_module as L
    from executorch.exir.backend import backend_api as B
    from torch.fx.passes import tools_common

    legalize, create = L.legalize_graph, B._create_partitions
    if legalize is not tools_common.legalize_graph:
        yield  # not the function this replaces
        return

    def legalize_in_place(gm):
        import operator

        import torch

        # torch 2.13's PRIORITIZED_OPS in legalize_graph: these jump the queue
        first = {operator.add, operator.mul, operator.sub, operator.floordiv, operator.truediv, operator.mod,
                 operator.le, operator.lt, operator.ge, operator.gt, operator.eq, operator.ne,
                 torch.ops.aten.sym_constrain_range.default, torch.ops.aten.sym_constrain_range_for_size.default,
                 torch.ops.aten._assert_async.msg, torch.ops.aten.scalar_tensor.default,
                 torch.ops.aten._assert_scalar.default}
        nodes = list(gm.graph.nodes)
        indeg = dict.fromkeys(nodes, 0)
        for node in nodes:
            for user in node.users:
                indeg[user] += 1
        queue = collections.deque(n for n in nodes if indeg[n] == 0)
        order = []
        while queue:
            cur = queue.popleft()
            order.append(cur)
            for user in cur.users:
                indeg[user] -= 1
                if indeg[user] == 0:
                    if user.op == "call_function" and user.target in first:
                        queue.appendleft(user)
                    else:
                        queue.append(user)
        if len(order) < len(nodes):
            raise RuntimeError(f"Input graph has cycles, unable to add {[n for n in indeg if indeg[n] != 0]}")
        prev = gm.graph._root
        for node in order:
            if prev._next is not node:
                prev.append(node)
            prev = node
        return gm

    def create_partitions(tagged_graph_module, *args, **kwargs):
        out = create(tagged_graph_module, *args, **kwargs)
        tagged_graph_module.recompile()
        return out

    L.legalize_graph, B._create_partitions = legalize_in_place, create_partitions
    try:
        yield
    finally:
        L.legalize_graph, B._create_partitions = legalize, create


def _fake_call_key(program_id: int, args):
    """(program, shape env, inputs' metadata) for a call on fake tensors only, with no
    tracing going on; None otherwise. Same program, same shape env and the same symbolic
    shapes, strides and dtypes in: the same output metadata out."""
    import torch
    import torch.utils._pytree as pytree
    from torch._C import _get_dispatch_mode, _TorchDispatchModeKey
    from torch._subclasses.fake_tensor import FakeTensor

    flat, spec = pytree.tree_flatten(args)
    tensors = [a for a in flat if isinstance(a, torch.Tensor)]
    if not tensors or not all(type(t) is FakeTensor for t in tensors):
        return None
    if _get_dispatch_mode(_TorchDispatchModeKey.PROXY) is not None:
        return None
    modes = {id(t.fake_mode) for t in tensors}
    env = tensors[0].fake_mode.shape_env
    if len(modes) != 1 or env is None:
        return None
    meta = tuple((tuple(map(str, a.shape)), tuple(map(str, a.stride())), a.dtype, str(a.device))
                 if isinstance(a, torch.Tensor) else ("value", repr(a)) for a in flat)
    return (program_id, id(env), str(spec), meta), env


def _metas(out):
    import torch
    import torch.utils._pytree as pytree

    flat, spec = pytree.tree_flatten(out)
    return spec, [_TensorMeta(tuple(a.shape), tuple(a.stride()), a.dtype, a.device) if isinstance(a, torch.Tensor)
                  else a for a in flat]


def _from_metas(metas):
    """Fresh fake outputs (the fake mode is active while a fake kernel runs) with those metadata."""
    import torch
    import torch.utils._pytree as pytree

    spec, flat = metas
    return pytree.tree_unflatten([torch.empty_strided(m.shape, m.stride, dtype=m.dtype, device=m.device)
                                  if isinstance(m, _TensorMeta) else m for m in flat], spec)


class _TensorMeta(tuple):
    __slots__ = ()

    def __new__(cls, shape, stride, dtype, device):
        return super().__new__(cls, (shape, stride, dtype, device))

    shape = property(lambda self: self[0])
    stride = property(lambda self: self[1])
    dtype = property(lambda self: self[2])
    device = property(lambda self: self[3])


SIGNATURE_MAPS = ("inputs_to_parameters", "inputs_to_buffers", "inputs_to_lifted_tensor_constants")


@contextlib.contextmanager
def _signature_maps_cached():
    """The partitioner asks, for every node, whether it is a parameter, buffer or constant;
    each question rebuilds the graph signature's name maps from all its inputs (quadratic
    in the model size). While partitioning, which changes no signature, build each once."""
    from torch.export.graph_signature import ExportGraphSignature

    originals = {name: getattr(ExportGraphSignature, name) for name in SIGNATURE_MAPS}
    cache: dict = {}

    def cached(name, prop):
        def get(self):
            key = (name, id(self), id(self.input_specs), len(self.input_specs))
            if key not in cache:
                cache[key] = (self, prop.fget(self))  # holds self: its id stays unique
            return cache[key][1]
        return property(get)

    for name, prop in originals.items():
        setattr(ExportGraphSignature, name, cached(name, prop))
    try:
        yield
    finally:
        for name, prop in originals.items():
            setattr(ExportGraphSignature, name, prop)


def _can_merge_partitions(self, p1, p2, partitions_by_id):
    """executorch 1.4.1's GroupBasedPartitioner._can_merge_partitions with its cycle test
    as one set operation: `any(n in combined for n in downstreams)` walks, in Python, the
    whole transitive downstream set of every external user, for every pair of partitions."""
    from torch.fx.passes.utils.fuser_utils import validate_partition

    combined = set(partitions_by_id[p1].nodes.keys()) | set(partitions_by_id[p2].nodes.keys())
    users = [user for node in combined for user in node.users if user not in combined]
    viewer = self.dependency_viewer
    if isinstance(viewer, _BitDependencyViewer):
        mask = viewer.mask(combined)
        if any(viewer.down[u] & mask for u in users if u in viewer.down):
            return False
    elif any(not combined.isdisjoint(viewer.downstreams_of(u)) for u in users):
        return False
    return validate_partition(list(combined))


class _BitDependencyViewer:
    """executorch's _DependencyViewer (every node's transitive users and inputs) with each
    set held as the bits of one Python int: building it unions sets of nodes for every
    edge, which on SmolLM2 is quadratic set work in Python; unions of ints are not."""

    def __init__(self, graph_module):
        nodes = list(graph_module.graph.nodes)
        self.index = {n: i for i, n in enumerate(nodes)}
        self.nodes = nodes
        self.down, self.up = {}, {}
        for node in reversed(nodes):
            bits = 0
            for user in node.users:
                bits |= (1 << self.index[user]) | self.down[user]
            self.down[node] = bits
        for node in nodes:
            bits = 0
            for arg in node.all_input_nodes:
                bits |= (1 << self.index[arg]) | self.up[arg]
            self.up[node] = bits

    def mask(self, nodes) -> int:
        bits = 0
        for n in nodes:
            if n in self.index:
                bits |= 1 << self.index[n]
        return bits

    def _nodes(self, bits: int) -> set:
        out, i = set(), 0
        while bits:
            if bits & 1:
                out.add(self.nodes[i])
            bits >>= 1
            i += 1
        return out

    def downstreams_of(self, node) -> set:
        return self._nodes(self.down.get(node, 0))

    def upstreams_of(self, node) -> set:
        return self._nodes(self.up.get(node, 0))


@contextlib.contextmanager
def fast_passes():
    if not enabled():
        yield
        return
    from executorch.backends.xnnpack._passes import XNNPACKPassManager

    original = XNNPACKPassManager.transform

    def transform(self):
        self.passes = needed(self.passes, self.exported_program)
        with _skip_idle_retraces():
            return original(self)

    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir.program import _program as P

    def partition(self, ep):
        with _signature_maps_cached():
            return partition_original(self, ep)

    from executorch.exir.backend.canonical_partitioners.group_partitioner import GroupBasedPartitioner

    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend

    gen, partition_original = P._gen_edge_manager_for_partitioners, XnnpackPartitioner.partition
    can_merge = GroupBasedPartitioner._can_merge_partitions
    multimethod = XnnpackBackend.__dict__.get("preprocess_multimethod")
    XnnpackBackend.preprocess_multimethod = _preprocess_forked(XnnpackBackend.preprocess_multimethod)
    GroupBasedPartitioner._can_merge_partitions = _can_merge_partitions
    from executorch.exir.backend.canonical_partitioners import group_partitioner as GP

    viewer = GP._DependencyViewer
    GP._DependencyViewer = _BitDependencyViewer
    XNNPACKPassManager.transform = transform
    XnnpackPartitioner.partition = partition
    P._gen_edge_manager_for_partitioners = lambda *a, **k: _edge_manager(gen, *a, **k)
    try:
        with _partitions_sorted_in_place():
            yield
    finally:
        XNNPACKPassManager.transform = original
        P._gen_edge_manager_for_partitioners = gen
        XnnpackPartitioner.partition = partition_original
        GroupBasedPartitioner._can_merge_partitions = can_merge
        GP._DependencyViewer = viewer
        if multimethod is None:
            del XnnpackBackend.preprocess_multimethod
        else:
            XnnpackBackend.preprocess_multimethod = multimethod


def infer_view_dims(gm):
    """Edge pass: a view whose new shape has exactly one symbolic size (the dynamic token
    count) gets -1 there instead, which means the same thing. XNNPACK takes such views
    (static reshape with one inferred dim) but refuses symbolic ones, so without this
    every reshape in attention breaks the layer into several delegate calls."""
    from torch.fx.passes.infra.pass_base import PassResult

    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_function" or "view_copy" not in str(node.target):
            continue
        shape = list(node.args[1])
        symbolic = [i for i, d in enumerate(shape) if not isinstance(d, int)]
        if len(symbolic) == 1 and -1 not in shape:
            shape[symbolic[0]] = -1
            node.args = (node.args[0], shape, *node.args[2:])
            changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return PassResult(gm, changed)


def _choose_qparams_shapes(input, mapping_type, block_size, target_dtype, quant_min=None, quant_max=None, eps=None,
                           scale_dtype=None, zero_point_dtype=None, keepdim=False):
    import torch
    from torchao.quantization.quant_primitives import _get_reduction_params

    if keepdim:
        shape = [input.shape[i] // block_size[i] for i in range(len(block_size))]
    else:
        full, dims = _get_reduction_params(block_size, input.size())
        shape = [d for i, d in enumerate(full) if i not in dims]
    zp_dtype = zero_point_dtype or (torch.int32 if mapping_type == "ASYMMETRIC" else input.dtype)
    return (input.new_empty(shape, dtype=scale_dtype or input.dtype), input.new_empty(shape, dtype=zp_dtype))


def _quantize_shapes(input, block_size, scale, zero_point, output_dtype, quant_min=None, quant_max=None):
    return input.new_empty(input.shape, dtype=output_dtype)


def _dequantize_shapes(input, block_size, scale, zero_point, input_dtype, quant_min=None, quant_max=None,
                       output_dtype=None):
    import torch

    return input.new_empty(input.shape, dtype=output_dtype or torch.float32)


SHAPES = {"choose_qparams_affine": _choose_qparams_shapes, "quantize_affine": _quantize_shapes,
          "dequantize_affine": _dequantize_shapes}


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor) or getattr(t, "is_meta", False)


@contextlib.contextmanager
def shape_kernels():
    """Override torchao's three ops' CompositeImplicitAutograd kernels with ones that, given
    fake (or meta) tensors, return only the output shapes; real tensors still run torchao's
    code. Exporting preserves these ops (XNNPACK lowers them), so under fake tensors their
    kernels are only ever asked for output shapes."""
    if not enabled():
        yield
        return
    import warnings

    import torch
    import torchao.quantization.quant_primitives as qp

    lib = torch.library.Library("torchao", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        for name, shapes in SHAPES.items():
            real = getattr(qp, "_" + name)

            def kernel(*args, _real=real, _shapes=shapes, **kwargs):
                return _shapes(*args, **kwargs) if _is_fake(args[0]) else _real(*args, **kwargs)

            lib.impl(name, kernel, "CompositeImplicitAutograd")
    try:
        with _linear_fake_rule():
            yield
    finally:
        lib._destroy()


@contextlib.contextmanager
def _linear_fake_rule():
    """aten.linear is preserved through lowering (XNNPACK takes it whole), and every pass
    that re-traces the graph asks fake tensors for its output, which torch answers by
    running linear's composite decomposition (Python `matmul`, with symbolic-shape
    reasoning) each time: 16% of an 8da4w SmolLM2 export. This fake-tensor rule gives the
    shape directly: input.shape[:-1] + (out_features,), contiguous, the input's dtype, as
    the decomposition's mm/addmm + view returns; other dtype mixes take the decomposition."""
    import torch
    from torch._subclasses import fake_impls

    op = torch.ops.aten.linear.default
    before = fake_impls.op_implementations_dict.get(op)

    def rule(fake_mode, func, input, weight, bias=None):
        if input.dtype == weight.dtype and (bias is None or bias.dtype == input.dtype) and input.dim() >= 1:
            with fake_mode:
                return input.new_empty((*input.shape[:-1], weight.shape[0]))
        if before is not None:
            return before(fake_mode, func, input, weight, bias)
        with fake_mode:
            return func.decompose(input, weight, bias)

    fake_impls.op_implementations_dict[op] = rule
    try:
        with _linear_composite_shapes():
            yield
    finally:
        if before is None:
            fake_impls.op_implementations_dict.pop(op, None)
        else:
            fake_impls.op_implementations_dict[op] = before


@contextlib.contextmanager
def _linear_composite_shapes():
    """The same shape rule where most of the fake calls to linear actually go: an edge
    pass re-traces by calling the op on fake tensors with the Python dispatcher on, so
    linear's CompositeImplicitAutograd kernel runs first (above the fake mode) and calls
    torch's Python `matmul` decomposition. A Python kernel at that key answers with the
    shape when the inputs are fake and nothing is being traced; anything else (a proxy or
    functionalization mode active, real tensors, mixed dtypes) takes the C++ composite
    kernel as before."""
    import torch
    from torch._C import DispatchKey, _TorchDispatchModeKey, _get_dispatch_mode
    from torch._subclasses.fake_tensor import FakeTensor

    op = torch.ops.aten.linear.default
    key = DispatchKey.CompositeImplicitAutograd
    saved = op.py_kernels.get(key)

    def kernel(input, weight, bias=None):
        if (type(input) is FakeTensor and type(weight) is FakeTensor and input.dtype == weight.dtype
                and (bias is None or bias.dtype == input.dtype) and input.dim() >= 1
                and _get_dispatch_mode(_TorchDispatchModeKey.PROXY) is None
                and _get_dispatch_mode(_TorchDispatchModeKey.FUNCTIONAL) is None):
            return input.new_empty((*input.shape[:-1], weight.shape[0]))
        # the C++ composite kernel itself: op.decompose would look up this Python kernel
        # first and call it again, forever (a backend that decomposes linear gets here)
        return op._op_dk(key, input, weight, bias)

    if saved is not None:  # someone else's kernel: leave it alone
        yield
        return
    op.py_impl(key)(kernel)
    op._dispatch_cache.clear()
    try:
        yield
    finally:
        op.py_kernels.pop(key, None)
        op._dispatch_cache.clear()


# Pure operators whose duplicates (same target, same inputs, same arguments) can be merged.
PURE = ("view_copy", "linear", "permute_copy", "mm.default", "addmm", "mul.Tensor", "add.Tensor", "rsqrt")


def dedupe(gm):
    """Edge pass: merge repeated pure computations on the same inputs (in place). The one
    that matters: the per-group input sums of asymmetric 4-bit linears that share an input
    (q/k/v, gate/up), which would otherwise be computed once per linear."""
    from torch.fx.passes.infra.pass_base import PassResult

    seen, removed = {}, 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not any(p in str(node.target) for p in PURE):
            continue
        key = (node.target, repr(node.args), repr(sorted(node.kwargs.items())))
        first = seen.get(key)
        if first is None:
            seen[key] = node
            continue
        node.replace_all_uses_with(first)
        gm.graph.erase_node(node)
        removed += 1
    if removed:
        gm.recompile()
    return PassResult(gm, bool(removed))
