"""The pieces of edgectl.lower.xnnpack_fast (passes, partitioner, shapes), each against what executorch does without it.
(The end-to-end check, byte-identical programs, is test_export_run.py's
test_fast_lowering_changes_no_byte.)"""

import torch
from torch.export import Dim


def _edge_graph(module, example, dynamic=None):
    from executorch.exir import EdgeCompileConfig, to_edge

    ep = torch.export.export(module, example, dynamic_shapes=dynamic, strict=False)
    return to_edge(ep, compile_config=EdgeCompileConfig(_check_ir_validity=False)).exported_program()


class _Mixed(torch.nn.Module):
    """t (NormalizeTranspose), a view (ReplaceBrokenOps), a scalar argument (ScalarToTensor),
    a symbolic size used as a tensor (SymToTensor), an int/float add (RemoveMixedType) and
    a memory-format copy (MemoryFormatOps): every rewrite the two fused runs hold."""

    def forward(self, x, n):
        y = x.t().contiguous().view(-1) * 2.0
        s = torch.ones(1) * x.shape[0]
        z = (n + 1.5).to(memory_format=torch.contiguous_format)
        return y.sum() + s + z.sum()


def _ops(ep):
    return [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]


def test_fused_edge_passes_give_the_same_graph(monkeypatch):
    from executorch.exir.program import _program as P

    from edgectl.lower.xnnpack_fast import passes

    example = (torch.randn(4, 3), torch.arange(3))
    dynamic = ({0: Dim("a", min=2, max=8)}, None)
    ref = _edge_graph(_Mixed(), example, dynamic)

    from executorch.exir import EdgeCompileConfig

    pre, post, patches = passes._fuse_edge_passes(P, EdgeCompileConfig(_check_ir_validity=False))
    names = [type(p).__name__ for p in pre]
    # with executorch 1.4.1 both runs fuse; if a release changes a pass, the run stays apart
    assert "ViewCopyOps+NormalizeTransposePass+ReplaceBrokenOpsWithFunctionalOpsPass+ScalarToTensorPass+SymToTensorPass" in names
    assert names[-1] == "RemoveMixedTypeOperators+OpReplacePass+MemoryFormatOpsPass"
    assert set(patches) == {"ReplaceViewOpsWithViewCopyOpsPass", "OpReplacePass", "MemoryFormatOpsPass"}

    monkeypatch.setattr(P, "_get_aten_to_edge_passes", lambda c: (pre, post))
    for attr, stub in patches.items():
        monkeypatch.setattr(P, attr, stub)
    fused = _edge_graph(_Mixed(), example, dynamic)
    assert _ops(fused) == _ops(ref)
    assert fused.graph_module.code == ref.graph_module.code


def test_only_passes_that_rewrite_in_call_skip_their_retrace():
    from executorch.backends.xnnpack._passes import ConvertToLinearPass, DecomposeConcatenate
    from executorch.exir.passes.const_prop_pass import ConstPropPass
    from executorch.exir.passes.memory_format_ops_pass import DimOrderOpsRevertPass
    from executorch.exir.passes.scalar_to_tensor_pass import ScalarToTensorPass

    from edgectl.lower.xnnpack_fast.passes import _rewrites_only_in_call

    def bare(cls):
        return cls.__new__(cls)

    assert _rewrites_only_in_call(bare(ConvertToLinearPass))
    assert _rewrites_only_in_call(bare(DecomposeConcatenate))
    # these do their work during the re-trace (call_operator), so it is never skipped
    assert not _rewrites_only_in_call(bare(ConstPropPass))
    assert not _rewrites_only_in_call(bare(DimOrderOpsRevertPass))
    assert not _rewrites_only_in_call(bare(ScalarToTensorPass))


def test_a_pass_that_edits_the_graph_is_still_retraced():
    from executorch.exir.pass_base import ExportPass

    from edgectl.lower.xnnpack_fast.passes import _skip_idle_retraces

    retraced = []

    class Idle(ExportPass):
        def call(self, gm):
            return super().call(gm)

    class Edits(ExportPass):
        def call(self, gm):
            for n in gm.graph.nodes:
                if n.op == "call_function" and n.target == torch.ops.aten.add.Tensor:
                    n.target = torch.ops.aten.sub.Tensor
            gm.recompile()
            return super().call(gm)

    def watch(self, gm):
        retraced.append(type(self).__name__)
        return original(self, gm)

    class M(torch.nn.Module):
        def forward(self, x):
            return x + 1

    gm = torch.export.export(M(), (torch.randn(2),)).graph_module
    original = ExportPass.call
    ExportPass.call = watch
    try:
        with _skip_idle_retraces():
            res_idle = Idle()(gm)
            res_edit = Edits()(gm)
    finally:
        ExportPass.call = original
    assert retraced == ["Edits"]
    assert res_idle.graph_module is gm
    assert "sub" in res_edit.graph_module.code and res_edit.graph_module is not gm


def test_linear_shape_rule_matches_the_decomposition():
    # The edge passes call ops with the Python dispatcher on: that is where the rule is
    # consulted (linear's composite kernel would otherwise reach torch's Python matmul).
    from torch._dispatch.python import enable_python_dispatcher
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from edgectl.lower.xnnpack_fast.shapes import shape_kernels

    mode = FakeTensorMode(shape_env=ShapeEnv())
    cases = [((1, 5, 16), (8, 16), None), ((3, 16), (8, 16), (8,)), ((16,), (8, 16), None), ((2, 1, 5, 16), (8, 16), (8,))]
    for x_shape, w_shape, b_shape in cases:
        x, w = torch.randn(x_shape), torch.randn(w_shape)
        b = torch.randn(b_shape) if b_shape else None
        with mode, enable_python_dispatcher():
            fx, fw = mode.from_tensor(x), mode.from_tensor(w)
            fb = mode.from_tensor(b) if b is not None else None
            want = torch.ops.aten.linear.default(fx, fw, fb)
            with shape_kernels():
                got = torch.ops.aten.linear.default(fx, fw, fb)
        real = torch.nn.functional.linear(x, w, b)
        assert got.shape == want.shape == real.shape
        assert got.stride() == want.stride() and got.dtype == want.dtype


def test_in_place_sort_orders_nodes_as_legalize_graph_does():
    import random

    from torch.fx.passes.tools_common import legalize_graph

    from edgectl.lower.xnnpack_fast.partitioner import _partitions_sorted_in_place

    class M(torch.nn.Module):
        def forward(self, x, y):
            a, b = x.sin(), y.cos()
            n = x.shape[0]
            torch._check(n > 1)
            return (a * b + a).relu() - b * n, a.exp()

    def shuffled_gm():
        gm = torch.export.export(M(), (torch.randn(3), torch.randn(3)),
                                 dynamic_shapes=({0: Dim("n", min=2, max=9)}, {0: Dim("n", min=2, max=9)})).graph_module
        # a valid but different order: move each call_function node to a random legal spot
        rng = random.Random(0)
        for node in [n for n in gm.graph.nodes if n.op == "call_function"]:
            lo = max([list(gm.graph.nodes).index(a) for a in node.all_input_nodes] + [0])
            spot = list(gm.graph.nodes)[rng.randint(lo, lo + 1) if lo + 1 < len(gm.graph.nodes) else lo]
            if all(u not in list(gm.graph.nodes)[: list(gm.graph.nodes).index(spot) + 1] for u in node.users):
                spot.append(node)
        return gm

    want = [n.name for n in legalize_graph(shuffled_gm()).graph.nodes]
    import executorch.exir.lowered_backend_module as L

    with _partitions_sorted_in_place():
        gm = shuffled_gm()
        before = {n.name: n for n in gm.graph.nodes}
        assert list(before) != want  # there is something to sort
        L.legalize_graph(gm)
    assert [n.name for n in gm.graph.nodes] == want
    assert all(before[n.name] is n for n in gm.graph.nodes)  # the same nodes, moved
    gm.graph.lint()


def test_forked_preprocess_returns_results_in_order_and_survives_a_failing_child(capsys):
    import os

    from edgectl.lower.xnnpack_fast.partitioner import _preprocess_forked

    parent = os.getpid()

    class Program:
        def __init__(self, n):
            self.graph = type("G", (), {"nodes": list(range(n))})()
            self.n = n

    class Backend:
        fail_in_child = False

        @classmethod
        def preprocess(cls, program, spec):
            if cls.fail_in_child and os.getpid() != parent:
                raise RuntimeError("boom")
            return (program.n, spec, os.getpid() == parent)

        @classmethod
        def preprocess_multimethod(cls, programs, specs):  # the original: one by one, here
            return {m: [cls.preprocess(p, s) for p, s in zip(programs[m], specs[m])] for m in programs}

    Backend.preprocess_multimethod = _preprocess_forked(Backend.preprocess_multimethod)
    programs = {"forward": [Program(n) for n in (5, 9, 2, 7)], "other": [Program(3)]}
    specs = {"forward": ["a", "b", "c", "d"], "other": ["e"]}
    got = Backend.preprocess_multimethod(programs, specs)
    assert {m: [r[:2] for r in rs] for m, rs in got.items()} == {
        "forward": [(5, "a"), (9, "b"), (2, "c"), (7, "d")], "other": [(3, "e")]}
    if len(os.sched_getaffinity(0)) >= 2:
        assert {r[2] for rs in got.values() for r in rs} == {True, False}  # both processes worked
    Backend.fail_in_child = True
    got = Backend.preprocess_multimethod(programs, specs)
    assert [r[:2] for r in got["forward"]] == [(5, "a"), (9, "b"), (2, "c"), (7, "d")]
    assert all(r[2] for rs in got.values() for r in rs)
    if len(os.sched_getaffinity(0)) >= 2:
        assert "boom" in capsys.readouterr().err


def test_bitset_dependencies_equal_executorchs():
    from executorch.exir.backend.canonical_partitioners.group_partitioner import _DependencyViewer

    from edgectl.lower.xnnpack_fast.partitioner import _BitDependencyViewer

    class M(torch.nn.Module):
        def forward(self, x, y):
            a = x.sin() + y
            b = a.cos() * x
            return (a + b).relu(), y.exp()

    gm = torch.export.export(M(), (torch.randn(3), torch.randn(3))).graph_module
    ref, bits = _DependencyViewer(gm), _BitDependencyViewer(gm)
    for node in gm.graph.nodes:
        assert bits.downstreams_of(node) == ref.downstreams_of(node)
        assert bits.upstreams_of(node) == ref.upstreams_of(node)
    x = next(n for n in gm.graph.nodes if n.name == "x")
    assert len(bits.downstreams_of(x)) > 3  # transitive, not only direct users


def test_constprop_runs_only_where_something_folds():
    from executorch.exir.passes.const_prop_pass import ConstPropPass

    from edgectl.lower.xnnpack_fast.passes import _foldable

    class Params(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(3))

        def forward(self, x):
            return (x * self.w.exp()).relu()

    ep = torch.export.export(Params(), (torch.randn(3),))
    # parameters are placeholders: nothing folds, and the pass's re-trace changes nothing
    assert not _foldable(ep)
    before = ep.graph_module.code
    assert ConstPropPass()(ep.graph_module).graph_module.code == before

    root = torch.nn.Module()
    root.register_buffer("c", torch.randn(3))
    g = torch.fx.Graph()
    x, c = g.placeholder("x"), g.get_attr("c")
    g.output(g.call_function(torch.ops.aten.add.Tensor, (x, g.call_function(torch.ops.aten.exp.default, (c,)))))
    gm = torch.fx.GraphModule(root, g)  # exp of a get_attr constant: that one folds
    assert _foldable(type("EP", (), {"graph_module": gm})())


def test_speedups_apply_only_on_the_versions_they_were_written_for(monkeypatch, capsys):
    """On the pinned versions the patches apply; on any other, every patch point stays
    ExecuTorch's own and one notice says why (the stock path's output is the reference
    test_export_run.test_fast_lowering_changes_no_byte compares against)."""
    import importlib

    from executorch.backends.xnnpack._passes import XNNPACKPassManager
    from executorch.exir.program import _program as P

    from edgectl.lower.xnnpack_fast import fence
    from edgectl.lower.xnnpack_fast.passes import fast_passes
    from edgectl.lower.xnnpack_fast.shapes import delegate_modules_cached, shape_kernels

    D = importlib.import_module("torch._higher_order_ops.executorch_call_delegate")
    monkeypatch.delenv("EDGECTL_SLOW_EXPORT", raising=False)
    fence.version_mismatch.cache_clear()
    assert fence.version_mismatch() is None and fence.enabled()  # this environment has the pins
    originals = (XNNPACKPassManager.transform, P._gen_edge_manager_for_partitioners, D.call_delegate_cpu)
    with fast_passes(), delegate_modules_cached():
        assert XNNPACKPassManager.transform is not originals[0]
        assert D.call_delegate_cpu is not originals[2]

    monkeypatch.setattr(fence, "version_mismatch", lambda: "executorch 1.5.1 (written for 1.4.1)")
    monkeypatch.setattr(fence, "_noticed", [])
    capsys.readouterr()
    for _ in range(2):
        with fast_passes(), delegate_modules_cached(), shape_kernels():
            assert (XNNPACKPassManager.transform, P._gen_edge_manager_for_partitioners, D.call_delegate_cpu) == originals
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "executorch 1.5.1 (written for 1.4.1)" in err and "stock lowering path" in err
