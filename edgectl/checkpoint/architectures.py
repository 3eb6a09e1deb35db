"""Which model architectures edgectl supports, answered without importing torch.

A model edgectl cannot build is refused from its config.json or its GGUF header alone, in
milliseconds, before torch (seconds) or a full GGUF parse (seconds for a large vocabulary)
is paid for. The Hugging Face architectures the one model builds are model_args.py's
(re-exported here); gguf_loader.py takes its GGUF list from here.
"""

from __future__ import annotations

import struct
from pathlib import Path

from edgectl.model_args import MODEL_TYPES, SUPPORTED_ARCHITECTURES, check_hf_config, hf_architecture  # noqa: F401
from edgectl.util.errors import EdgectlError

# GGUF `general.architecture` values gguf_loader converts
GGUF_ARCHITECTURES = ("gemma3", "llama", "qwen2")

_GGUF_MAGIC = b"GGUF"
# GGUF metadata value types: fixed sizes of the scalar ones; 8 = string, 9 = array
_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def check_gguf(path: Path) -> str | None:
    """The GGUF file's `general.architecture`, or a one-line EdgectlError if it is not a
    GGUF file or its architecture is not supported. Reads the header only (the key comes
    first in files llama.cpp writes; the scan stops as soon as it is found). None when
    the header does not name one (the full parse then decides)."""
    arch = gguf_architecture(path)
    if arch is not None and arch not in GGUF_ARCHITECTURES:
        raise EdgectlError(f"{path}: GGUF architecture {arch!r} is not supported "
                           f"(supported: {', '.join(GGUF_ARCHITECTURES)})")
    return arch


def gguf_architecture(path: Path) -> str | None:
    """`general.architecture` from a GGUF header (versions 2 and 3), without the gguf
    library. None if the key is absent or the version is older."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
            if len(head) < 24 or head[:4] != _GGUF_MAGIC:
                raise EdgectlError(f"{path}: not a GGUF file (bad magic)")
            version, _n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
            if version < 2:
                return None
            for _ in range(n_kv):
                key = _read_string(f, path)
                (vtype,) = struct.unpack("<I", _read(f, 4, path))
                if key == "general.architecture" and vtype == _STRING:
                    return _read_string(f, path)
                _skip_value(f, vtype, path)
    except OSError as e:
        raise EdgectlError(f"{path}: cannot read ({e.strerror})") from e
    return None


def _read(f, n: int, path: Path) -> bytes:
    b = f.read(n)
    if len(b) != n:
        raise EdgectlError(f"{path}: GGUF header is truncated")
    return b


def _read_string(f, path: Path) -> str:
    (n,) = struct.unpack("<Q", _read(f, 8, path))
    if n > 1 << 24:
        raise EdgectlError(f"{path}: GGUF header is damaged (a {n}-byte key)")
    return _read(f, n, path).decode("utf-8", errors="replace")


def _skip_value(f, vtype: int, path: Path) -> None:
    if vtype in _SCALAR_SIZE:
        f.seek(_SCALAR_SIZE[vtype], 1)
    elif vtype == _STRING:
        (n,) = struct.unpack("<Q", _read(f, 8, path))
        f.seek(n, 1)
    elif vtype == _ARRAY:
        itype, count = struct.unpack("<IQ", _read(f, 12, path))
        if itype in _SCALAR_SIZE:
            f.seek(_SCALAR_SIZE[itype] * count, 1)
        else:
            for _ in range(count):
                _skip_value(f, itype, path)
    else:
        raise EdgectlError(f"{path}: GGUF header is damaged (value type {vtype})")
