"""Shape-only answers under fake tensors: torchao's quantization ops, aten.linear, and delegate calls seen before."""

from __future__ import annotations

import contextlib

from edgectl.lower.xnnpack_fast import fence


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
    if not fence.enabled():
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


@contextlib.contextmanager
def delegate_modules_cached():
    """Every re-trace of a graph that holds delegate calls (XNNPACK's partitions, already
    lowered) asks each call for its output on fake tensors, which torch answers by running
    the partition's original program (`call_delegate_cpu`): `original_module.module()`
    rebuilds that program as a fresh module each time (unlift, recompile), then runs it.
    This is the same function, with each module built once; and a call on fake tensors
    whose program, shape env and input shapes, strides and dtypes were seen before gets
    fresh fake outputs of the shapes that call produced, without running the program."""
    if not fence.enabled():
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
