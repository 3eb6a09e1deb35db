"""The measured figures of a shard set: per-variant load cost, importance on the calibration text, and their check through the exported programs."""

from __future__ import annotations

from pathlib import Path

from edgectl.formats.manifest import Manifest


def _measure_load(tmp: Path, manifest: Manifest) -> None:
    from edgectl.model_args import ModelArgs, cache_len
    from edgectl.shard.shard_measure import run_measure

    m = manifest.model
    args = ModelArgs.from_dict(m)
    shape = {"dim": m["dim"], "n_kv_heads": m["n_kv_heads"], "head_dim": m.get("head_dim") or m["dim"] // m["n_heads"],
             "max_seq_len": manifest.max_seq_len, "vocab_size": m["vocab_size"]}
    items = []
    for sh in manifest.shards:
        for p, v in sh.variants.items():
            tid = f"{sh.name}|{p}"
            if "table" in v.extra:
                items.append({"id": tid, "dir": str(tmp), "table": v.extra["table"]})
            else:
                item = {"id": tid, "path": str(tmp / v.file)}
                if sh.kind in ("layers", "head"):
                    item["call"] = {"kind": sh.kind, "n_layers": len(sh.layers), **shape,
                                    # a sliding layer's cache: its ring (model_args.ring_len)
                                    "cache_lens": [cache_len(args, i, manifest.max_seq_len, manifest.max_tokens_per_call)
                                                   for i in sh.layers]}
                items.append(item)
    res = run_measure(items)
    for sh in manifest.shards:
        for p, v in sh.variants.items():
            r = res[f"{sh.name}|{p}"]
            v.resident_bytes, v.load_ms = r["resident_bytes"], round(r["load_ms"], 3)
            v.extra["anon_bytes"] = r["anon_bytes"]
            for k in ("planned_bytes", "compute_ms"):  # absent without the native shim
                if k in r:
                    v.extra[k] = round(r[k], 4) if k == "compute_ms" else r[k]


def _importance(ckpt, tmp: Path, manifest: Manifest, s, windows, step, count) -> None:
    """`s`: the run's shard.ShardSettings; `step`: its shard.Step progress callback."""
    from edgectl.shard.importance import EagerShards, ShardSpec, measure
    from edgectl.shard.shard_build import load_base, stored_precision

    W = max(len(w) for w in windows)
    step("loading the model for importance")
    model = load_base(ckpt, W)
    specs = [ShardSpec(sh.name, sh.kind, sh.layers) for sh in manifest.shards]
    step("quantizing shards (eager)")
    eager = EagerShards(model, specs, list(s.precisions), s.group_size,
                        (lambda d, t: count("quantizing", d, t)) if count else None,
                        base=stored_precision(ckpt.quantization))
    if len(s.precisions) > 1:
        step(f"importance on {sum(len(w) - 1 for w in windows)} calibration tokens")
        figures, summary = measure(eager, windows, (lambda d, t: count("importance", d, t)) if count else None)
        for sh in manifest.shards:
            for p in s.precisions[1:]:
                sh.variants[p].importance = figures[sh.name, p]
    else:
        summary = {"tokens": sum(len(w) - 1 for w in windows), "windows": len(windows)}
    manifest.calibration.update(file=str(s.calibration), window=W, **summary)
    if len(s.precisions) > 1 and s.verify:
        step("checking importance figures through the .pte files")
        manifest.calibration["pte_check"] = verify_with_pte(tmp, manifest, eager, windows[0], s.verify)
    manifest.calibration["ranking"] = ranking(manifest)
    del eager, model


def ranking(manifest: Manifest) -> list[dict]:
    """Shards by the KL of their lowest precision, most important first."""
    low = manifest.precisions[-1]
    rows = [{"shard": sh.name, "precision": low, "kl": sh.variants[low].importance.kl,
             "ppl_delta": sh.variants[low].importance.ppl_delta}
            for sh in manifest.shards if sh.variants[low].importance is not None]
    return sorted(rows, key=lambda r: -r["kl"])


def verify_with_pte(directory: Path, manifest: Manifest, eager, window: list[int], n: int) -> list[dict]:
    """Re-measure a sample of importance figures through the exported programs on one
    calibration window: the most and least important shard at the lowest precision, and
    the head, each against the all-top chain of .pte files (and eager on the same window)."""
    import torch

    from edgectl.shard.importance import window_scores
    from edgectl.shard.chain import ShardChain

    low = manifest.precisions[-1]
    ranked = [r["shard"] for r in ranking(manifest)]
    sample = list(dict.fromkeys([ranked[0], ranked[-1], "head", *ranked[1:]]))[:n]
    tokens = torch.tensor([window])

    threads = torch.get_num_threads()

    def pte_run(choice):
        chain = ShardChain(directory, choice, manifest)
        torch.set_num_threads(threads)  # the runtime sets torch to 1 thread; the eager side wants them all
        return lambda w: chain.forward(w, 0, all_logits=True)

    with torch.no_grad():
        ref_pte = pte_run({})(window)
        ref_eager = eager.run({}, tokens)[0]
        out = [{"shard": "(all top)", "precision": manifest.precisions[0],
                "max_abs_logit_diff_pte_vs_eager": float((ref_pte - ref_eager).abs().max())}]
        for name in sample:
            kl_p, ppl_p = window_scores(pte_run({name: low}), ref_pte, window)
            kl_e, ppl_e = window_scores(lambda w: eager.run({name: low}, tokens)[0], ref_eager, window)
            out.append({"shard": name, "precision": low, "tokens": len(window) - 1,
                        "kl_pte": kl_p, "kl_eager": kl_e, "ppl_pte": ppl_p, "ppl_eager": ppl_e})
    return out
