"""Process-level helpers around native libraries: hold back their stderr and stdout, return freed heap."""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import sys
import tempfile

from edgectl.util.errors import EdgectlError


def malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


@contextlib.contextmanager
def native_stderr_captured():
    """Hold back what the C++ runtime writes to fd 2 (cpuinfo probing, thread pool set-up)
    and replay it only if the block fails, or always with EDGECTL_DEBUG=1."""
    if os.environ.get("EDGECTL_DEBUG") == "1":
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        except EdgectlError:  # edgectl's own one-line refusal (a damaged file, ...): no chatter before it
            raise
        except BaseException:
            os.dup2(saved, 2)
            tmp.seek(0)
            sys.stderr.write(tmp.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _debug() -> bool:
    return os.environ.get("EDGECTL_DEBUG") == "1"


@contextlib.contextmanager
def library_prints_to_stderr():
    """Keep what a backend's Python code prints (OpenVINO's partitioner prints every op it
    does not take) off stdout, which carries results and --json: dropped, or on stderr
    with EDGECTL_DEBUG=1."""
    with contextlib.redirect_stdout(sys.stderr if _debug() else io.StringIO()):
        yield
