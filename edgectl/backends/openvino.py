"""OpenVINO for `export --backend openvino`: its partitioner, its int8, and what its runtime needs.

ExecuTorch 1.4.1 carries OpenVINO's ahead-of-time part (executorch.backends.openvino) and
registers `OpenvinoBackend` in its runtime, which opens OpenVINO's C library at first use;
the `openvino` package (`pip install 'edgectl[openvino]'`) brings that library, NNCF the
quantizer. What this module works around, each measured on this project's machine:

- the runtime never resizes a delegate's outputs, so programs are exported with static
  shapes (one token per call, backends.Backend.static);
- it fails a delegate call that returns a 0-dim tensor: such operators stay portable;
- it imports the compiled model with no properties, so OpenVINO's CPU plugin picks its
  own inference precision: bf16 where the CPU has it, see `fp32`;
- NNCF compresses every linear's weight, including the model's arithmetic ones.

Nothing here imports torch, executorch or openvino at module level.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re

from edgectl.util.errors import EdgectlError

INSTALL = "pip install 'edgectl[openvino]'"

# OpenVINO's CPU plugin computes in bf16 by default on a CPU with avx512_bf16 or AMX, and
# the runtime gives a program no way to ask for f32. On this project's AMD EPYC
# (avx512_bf16) OpenVINO 2025.4's bf16 put stories260K's logits 0.24 off (of ~19), and a
# bare embedding -> linear came back as ~1e30. Capping oneDNN's instruction set below bf16
# makes f32 the plugin's default (the logits then match eager PyTorch to ~2e-5). oneDNN
# reads it once per process, when OpenVINO's CPU plugin first runs. A user's own
# ONEDNN_MAX_CPU_ISA wins (ALL lifts the cap).
ISA_CAP = "AVX512_CORE_VNNI"


def fp32() -> None:
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", ISA_CAP)


def _import(module: str, *names: str):
    """`from executorch.backends.openvino<module> import names`, quietly. The package
    imports NNCF, which would report usage to Google Analytics from this process (it asks
    no one: no consent file counts as yes); NNCF_CI is the switch NNCF reads to stay off.
    Its tokenizer dependency logs a line on stderr when loaded."""
    from edgectl.util.native import native_stderr_captured

    os.environ.setdefault("NNCF_CI", "1")
    try:
        with native_stderr_captured():
            mod = importlib.import_module("executorch.backends.openvino" + module)
    except ImportError as e:
        raise EdgectlError(f"the openvino backend needs the openvino and nncf packages ({e})", hint=INSTALL) from e
    return [getattr(mod, n) for n in names]


def partitioners() -> list:
    from executorch.exir.backend.compile_spec_schema import CompileSpec

    fp32()  # export compiles the model once, in this process
    (base,) = _import(".partitioner", "OpenvinoPartitioner")
    device = os.environ.get("EDGECTL_OPENVINO_DEVICE", "CPU")
    return [_no_scalar_outputs(base)([CompileSpec("device", device.encode())])]


def _no_scalar_outputs(base):
    """OpenVINO's partitioner, leaving operators with a 0-dim result (pos[0], the cache
    position on its way to .item()) to the portable kernels: the runtime fails a delegate
    call that returns a 0-dim tensor (error 0x1 at execute)."""
    import torch

    import executorch.backends.openvino.partitioner as P

    class Support(P.OpenvinoOperatorsSupport):
        def is_node_supported(self, submodules, node):
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and val.dim() == 0:
                return False
            return super().is_node_supported(submodules, node)

    class NoScalarOpenvinoPartitioner(base):
        def partition(self, exported_program):
            saved, P.OpenvinoOperatorsSupport = P.OpenvinoOperatorsSupport, Support
            try:
                return super().partition(exported_program)
            finally:
                P.OpenvinoOperatorsSupport = saved

    return NoScalarOpenvinoPartitioner


# `--scheme int8`. edgectl's own int8 (torchao's 8-bit dynamic activations x 8-bit weights,
# quant/weights.py) does not lower to OpenVINO: its partitioner takes none of torchao's
# quantize/dequantize ops and the portable runtime has no kernels for them ("Missing out
# variants: torchao::quantize_affine, ..."). What does: ExecuTorch's OpenVINOQuantizer,
# NNCF's weight compression (ExecuTorch's own LLM export calls it "openvino_8wo"): 8-bit
# asymmetric weights per output channel, which OpenVINO runs as int8-compressed matmuls.
INT8_RECORD = {
    "format": "openvino-nncf/1", "scheme": "int8", "mode": "INT8WO_ASYM", "group_size": -1,
    "weights": "8-bit asymmetric, per output channel (NNCF weight compression)",
    "activations": "fp32 in the program (OpenVINO's CPU plugin may quantize them on the fly: "
                   "its DYNAMIC_QUANTIZATION_GROUP_SIZE default is 32)",
    "smoothquant": False,
}


def quantize_int8(ep, example_args, dynamic_shapes):
    """The exported program with its linear weights compressed to int8, exported again."""
    import torch
    import torch.utils._pytree as pytree
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from edgectl.util.native import library_prints_to_stderr
    from edgectl.util.native import native_stderr_captured

    OpenVINOQuantizer, QuantizationMode = _import(".quantizer", "OpenVINOQuantizer", "QuantizationMode")
    gm = ep.module()
    quantizer = OpenVINOQuantizer(mode=QuantizationMode.INT8WO_ASYM, group_size=-1, ratio=None)
    quantizer.set_ignored_scope(names=structural_linears(gm), validate=False)
    fresh = pytree.tree_map_only(torch.Tensor, torch.clone, example_args)  # the call writes its caches
    with torch.no_grad(), library_prints_to_stderr():
        m = prepare_pt2e(gm, quantizer)
        with native_stderr_captured():  # llama::custom_sdpa logs each eager call
            m(*fresh)  # weight-only: data-free, one call completes the preparation
        m = convert_pt2e(m, fold_quantize=False)
        return torch.export.export(m, example_args, dynamic_shapes=dynamic_shapes, strict=False,
                                   prefer_deferred_runtime_asserts_over_guards=True)


def structural_linears(gm) -> list[str]:
    """The linears whose "weight" is arithmetic, not a learned matrix: RMSNorm's mean of
    squares (a 1-row matrix of 1/dim, model.RMSNorm.mean_w) and RoPE's pair rotation
    (Attention.rot). NNCF would compress them too, and a row of equal values has no range:
    1/64 came back as 3e-5 (its scale clamped to 1.2e-7), the logits off by ~300."""
    import torch

    names = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.linear.default and len(node.args) > 1:
            w = node.args[1]
            if getattr(w, "op", None) == "get_attr" and re.search(r"(mean_w|rot)(_copy_\d+)?$", str(w.target)):
                names.append(node.name)
    return names


def library() -> str | None:
    """libopenvino_c.so of the installed openvino package (found without importing it), or
    None. The runtime opens it by that bare name, which the package's versioned file
    (libopenvino_c.so.2541) does not answer to, or from $OPENVINO_LIB_PATH."""
    spec = importlib.util.find_spec("openvino")
    for base in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(glob.glob(os.path.join(base, "libs", "libopenvino_c.so*")))
        if found:
            return found[0]
    return None


def prepare_runtime() -> None:
    """Point the runtime's OpenVINO backend at the openvino package's library (before it
    first looks for it); a user's own OPENVINO_LIB_PATH wins."""
    if "OPENVINO_LIB_PATH" not in os.environ:
        lib = library()
        if lib:
            os.environ["OPENVINO_LIB_PATH"] = lib
