"""Does a `.pte` compute the same on the device as here? Next-token logits over real text.

    python scripts/device_parity.py MODEL.pte --device ssh:root@127.0.0.1:2222 \\
        --text ../shared/corpus/wikitext-2/wiki.valid.raw --tokens 256 [--json]

The `.pte` goes to the device's store (edgectl/device/store.py); the device's edgectl runs
it over the first N tokens of the text (all logits, one program call per chunk), and sends
the logits back as a .npy; this machine computes the same. Printed: the positions whose
argmax agrees, the max and mean absolute logit difference, how far the two disagree in
probability (max |p_dev - p_here| over the vocabulary), and next-token accuracy on the text
of each; where the argmaxes differ, how close a call it was here (the top logit minus the logit
of the device's choice). ARM kernels round differently from x86 ones, so the logits are compared, not only
a few greedy tokens. The device's time means nothing when it is emulated.
"""

from __future__ import annotations

import argparse
import io
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from edgectl.device.info import FIND_PYTHON
from edgectl.device.remote_run import send_artifact
from edgectl.device.ssh import ssh_argv, ssh_error
from edgectl.device.target import parse_target

CHUNK = 32

DEVICE_SCRIPT = r'''
import io, json, sys
import numpy as np
from edgectl.runtime.artifact import open_artifact
path, ids, chunk = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
m = open_artifact(path)
out = np.concatenate([m.forward(ids[i:i + chunk], i, all_logits=True) for i in range(0, len(ids), chunk)])
buf = io.BytesIO()
np.save(buf, out.astype(np.float32))
sys.stdout.buffer.write(buf.getvalue())
'''


def logits_here(pte: Path, ids: list[int]) -> np.ndarray:
    from edgectl.runtime.artifact import open_artifact

    m = open_artifact(pte)
    return np.concatenate([m.forward(ids[i:i + CHUNK], i, all_logits=True) for i in range(0, len(ids), CHUNK)])


def logits_there(target, pte: Path, ids: list[int]) -> np.ndarray:
    remote = send_artifact(target, pte)
    cmd = (FIND_PYTHON + f'"$p" -c {shlex.quote(DEVICE_SCRIPT)} "{remote}" {shlex.quote(json.dumps(ids))} {CHUNK}')
    r = subprocess.run(ssh_argv(target, cmd), capture_output=True)
    if r.returncode == 255:
        raise ssh_error(target, r.stderr.decode(errors="replace"))
    if r.returncode != 0:
        sys.exit(f"device_parity: the device's run failed (exit {r.returncode}):\n{r.stderr.decode(errors='replace')[-2000:]}")
    return np.load(io.BytesIO(r.stdout))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pte", type=Path)
    ap.add_argument("--device", required=True, help="ssh:[user@]host[:port]")
    ap.add_argument("--text", type=Path, required=True, help="a text file; its first --tokens tokens are scored")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    a = ap.parse_args()
    from edgectl.runtime.artifact import open_artifact
    from edgectl.runtime.run import tokenizer_for

    tok = tokenizer_for(open_artifact(a.pte))
    ids = tok.encode(a.text.read_text())[: a.tokens]
    t0 = time.perf_counter()
    here = logits_here(a.pte, ids)
    t1 = time.perf_counter()
    there = logits_there(parse_target(a.device), a.pte, ids)
    t2 = time.perf_counter()
    if there.shape != here.shape:
        sys.exit(f"device_parity: shapes differ: here {here.shape}, device {there.shape}")
    diff = np.abs(here - there)
    p_diff = np.abs(softmax(here.astype(np.float64)) - softmax(there.astype(np.float64))).max(-1)
    nxt = np.array(ids[1:])
    a_here, a_there = here.argmax(-1), there.argmax(-1)
    rows = np.arange(len(ids))
    # where the argmaxes differ: how close a call it was here (top logit minus the logit of the device's choice)
    gap = (here[rows, a_here] - here[rows, a_there])[a_here != a_there]
    res = {
        "pte": a.pte.name, "device": a.device, "tokens": len(ids),
        "argmax_agree": float((a_here == a_there).mean()),
        "max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
        "logit_scale_abs_mean": float(np.abs(here).mean()),
        "argmax_disagreements": int(gap.size),
        "disagreement_logit_gap_max": float(gap.max()) if gap.size else 0.0,
        "max_prob_diff": float(p_diff.max()), "median_prob_diff": float(np.median(p_diff)),
        "next_token_acc_here": float((here[:-1].argmax(-1) == nxt).mean()),
        "next_token_acc_device": float((there[:-1].argmax(-1) == nxt).mean()),
        "seconds_here": round(t1 - t0, 2), "seconds_device": round(t2 - t1, 2),
    }
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        for k, v in res.items():
            print(f"{k:24} {v:.6g}" if isinstance(v, float) else f"{k:24} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
