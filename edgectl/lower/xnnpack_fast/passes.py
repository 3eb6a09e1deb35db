"""`fast_passes()`: XNNPACK's preprocess and the aten-to-edge conversion with idle passes and re-traces skipped and local rewrites fused."""

from __future__ import annotations

import contextlib

from edgectl.lower.xnnpack_fast import fence
from edgectl.lower.xnnpack_fast.partitioner import (
    _BitDependencyViewer,
    _can_merge_partitions,
    _partitions_sorted_in_place,
    _preprocess_forked,
    _signature_maps_cached,
)


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
def fast_passes():
    if not fence.enabled():
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
