"""The stock-runner interface (`export --interface stock`, the default of `export --plan`):
the same numbers as edgectl's own programs, and a file ExecuTorch's own TextLLMRunner runs."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest

from test_export_plan import PROMPT, _logits, _plan  # tests/lower/, beside this file


@pytest.fixture(scope="module")
def fp32_model(stories_dir):
    from edgectl.checkpoint.checkpoint import load_model, resolve

    return load_model(resolve(str(stories_dir)), 128).eval()


@pytest.mark.real_model
def test_stock_model_matches_ours_step_by_step(fp32_model):
    """Prefill, then decode steps: the cache-inside module (the stock runners' interface)
    gives the logits of the model with the caller's caches (the default .pte's form)."""
    import torch

    from edgectl.lower.stock import StockTransformer

    m = fp32_model
    st = StockTransformer(copy.deepcopy(m), 128).eval()
    tokens = (PROMPT * 5)[:40]
    ks, vs = m.empty_caches()
    calls = [(0, 29)] + [(i, i + 1) for i in range(29, len(tokens))]
    with torch.no_grad():
        for a, b in calls:
            t = tokens[a:b]
            ref = m(torch.tensor([t]), torch.arange(a, b), torch.tensor([len(t) - 1]), ks, vs)
            got = st(torch.tensor([t]), torch.tensor([a]))
            assert (got[0] - ref[0, -1]).abs().max().item() < 1e-4, (a, b)


@pytest.mark.real_model
@pytest.mark.slow
def test_plan_export_runs_on_executorchs_text_llm_runner(fp32_model, stories_dir, tmp_path):
    """`edgectl export --plan` writes a stock-interface .pte + tokenizer file; its logits
    equal the eager mix's, and ExecuTorch's TextLLMRunner (the C++ runner llama_main and
    the mobile apps use) generates, greedily, exactly what `edgectl run` does from it,
    with a prompt longer than the prefill chunk (the runner splits it by get_max_seq_len)."""
    from edgectl.cli.main import main
    from edgectl.lower.export import quantize_by_plan
    from edgectl.runtime.run import tokenizer_for
    from edgectl.runtime.runtime import StockPteModel
    from edgectl.runtime.artifact import open_artifact

    plan = _plan(["8da4w", "int8", "fp32", "int8", "fp32"], "int8")
    (tmp_path / "plan.json").write_text(json.dumps(plan.to_dict()))
    out = tmp_path / "mixed.pte"
    assert main(["export", str(stories_dir), "--plan", str(tmp_path / "plan.json"), "-o", str(out),
                 "--max-seq-len", "128", "--prefill-chunk", "16"]) == 0
    tok = tmp_path / "mixed.tokenizer.model"  # stories260K is a SentencePiece model
    assert tok.read_bytes() == (stories_dir / "tokenizer.model").read_bytes()
    model = open_artifact(out)
    assert isinstance(model, StockPteModel) and model.meta["interface"] == "stock"

    eager = copy.deepcopy(fp32_model)
    quantize_by_plan(eager, plan)
    import torch

    assert (torch.from_numpy(model.forward(PROMPT, 0, all_logits=True)) - _logits(eager)).abs().max().item() < 1e-3

    # Both in fresh processes with one MKL thread (what `edgectl run` sets up; see
    # edgectl.util.env.one_blas_thread): custom_sdpa's MKL calls on several threads sum in a
    # varying order, and greedy text then varies run to run at near-ties.
    prompt, n = "Once upon a time, there was a little dog named Max who lived in a big house", 40
    assert len(tokenizer_for(model).encode(prompt)) > 16
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    ours = subprocess.run([sys.executable, "-c", "import sys; from edgectl.cli.main import main; sys.exit(main(sys.argv[1:]))",
                           "run", str(out), "--prompt", prompt, "-n", str(n)],
                          capture_output=True, text=True, env=env, check=True).stdout.strip()
    theirs = subprocess.run([sys.executable, "-c", TEXT_LLM_RUNNER, str(out), str(tok), prompt, str(n)],
                            capture_output=True, text=True, env=env, check=True).stdout.splitlines()[-1]
    assert len(ours) > 40 and json.loads(theirs).strip() == ours


TEXT_LLM_RUNNER = """
import json
import sys
from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (llama:: kernels)
import executorch.kernels.quantized  # noqa: F401
from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

pte, tok, prompt, n = sys.argv[1:]
pieces = []
TextLLMRunner(pte, tok).generate(prompt, GenerationConfig(echo=False, max_new_tokens=int(n), temperature=0.0, num_bos=1),
                                 token_callback=pieces.append)
print(json.dumps("".join(pieces)))  # last line: the runner prints its own stats on stdout too
"""
