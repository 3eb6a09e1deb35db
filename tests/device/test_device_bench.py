"""`edgectl bench --device`: the same bench run on the device, its rows (naming the device) merged
with local ones in one table and one JSON. The device is the stand-in for `ssh` of
test_device_run (the remote command runs here, HOME a tmp dir): it checks the protocol and
the merge, not a device's speed."""

from __future__ import annotations

import json

from test_device_run import _device, _run, _sha, stories_shards  # noqa: F401  (a fixture)

BENCH = ["--repeat", "1", "--prompt-tokens", "8", "--new-tokens", "4"]


def test_bench_rows_of_two_devices_in_one_table(capsys, tmp_path, monkeypatch, stories_pte, stories_shards):  # noqa: F811
    home = _device(tmp_path, monkeypatch)
    rc, out, err = _run(capsys, "bench", stories_pte, stories_shards, "--device", "local", "--device", "ssh:pi@board",
                        "--memory-budget", "400MB", *BENCH, "--json")
    assert rc == 0, err
    data = json.loads(out)
    rows = data["rows"]
    assert [r["device"]["name"] for r in rows] == ["here", "here", "pi@board", "pi@board"]
    # the device's rows name the local artifacts, with the same options as the local rows
    assert [(r["artifact"], r["options"]) for r in rows[:2]] == [(r["artifact"], r["options"]) for r in rows[2:]]
    assert rows[1]["options"] == {"budget": 400_000_000}
    for r in rows:
        assert r["status"] == "ok" and r["summary"]["decode_tok_s"]["mean"] > 0
        assert {"cpu", "cores", "mem_total_bytes", "emulated"} <= set(r["device"])
        assert r["runs"][0]["new_tokens"] == 4
    assert rows[3]["runs"][0]["plan"]["budget_bytes"] == 400_000_000  # planned there, under the budget
    assert rows[0]["decode_ratio"] == 1.0  # ratios over the first row of the merged table
    assert "pi@board (" in err and "here (" in err  # the table (stderr with --json) has a device column
    sets = home / ".cache" / "edgectl" / "sets"
    assert (sets / _sha(stories_shards / "manifest.json") / ".remeasured").is_file()  # the device's own figures
    assert not list((home / ".cache" / "edgectl").glob("bench-*.json"))  # the device's report is removed


def test_bench_device_row_failure_fails_the_bench(capsys, tmp_path, monkeypatch):
    _device(tmp_path, monkeypatch)
    bad = tmp_path / "bad.pte"
    bad.write_bytes(b"not a program")
    rc, out, err = _run(capsys, "bench", bad, "--device", "ssh:board", *BENCH)
    assert rc == 1
    assert any(ln.startswith("edgectl: error: bad.pte") for ln in err.splitlines()), err


def test_bench_prompt_file_on_the_device(capsys, tmp_path, monkeypatch, stories_pte):
    """The prompt file goes to the device's store with the artifact; the device reads the same
    bytes (sha256), and its runs take the same prompts, in the same order, as the local ones."""
    home = _device(tmp_path, monkeypatch)
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps({"question_id": i, "turns": [t]}) + "\n"
                         for i, t in enumerate(["Once upon a time", "The little dog ran to the park and"])))
    rc, out, err = _run(capsys, "bench", stories_pte, "--device", "local", "--device", "ssh:board", "--prompt-file", q,
                        "--no-chat", "--repeat", "2", "--new-tokens", "4", "--json")
    assert rc == 0, err
    data = json.loads(out)
    pf = data["settings"]["prompt_file"]
    assert pf["path"] == str(q.resolve()) and pf["sha256"] == _sha(q) and pf["format"] == "jsonl" and pf["chat"] is False
    here, there = data["rows"]
    assert there["device"]["name"] == "board"
    for a, b in zip(here["runs"], there["runs"]):
        assert (a["prompt_index"], a["prompt_tokens"], a["output_sha256"]) == \
            (b["prompt_index"], b["prompt_tokens"], b["output_sha256"])
    assert [r["prompt_index"] for r in there["runs"]] == [0, 1]
    assert (home / ".cache" / "edgectl" / "store" / f"{_sha(q)}.jsonl").is_file()


def test_bench_draft_on_the_device(capsys, tmp_path, monkeypatch, stories_pte, stories_shards):  # noqa: F811
    """--draft with an ssh: device: lookup goes as it is, a draft artifact is sent and named by its
    device path there; the device's rows name the local draft, and greedy output matches the local rows."""
    from edgectl.device import remote_bench
    from edgectl.device.remote_run import Remote

    home = _device(tmp_path, monkeypatch)
    calls = []  # the stand-in device shares this file system: check what the device is told, too
    real = remote_bench.run_edgectl
    monkeypatch.setattr(remote_bench, "run_edgectl", lambda t, args, **kw: calls.append(list(args)) or real(t, args, **kw))
    rc, out, err = _run(capsys, "bench", stories_shards, "--device", "local", "--device", "ssh:board",
                        "--draft", f"lookup,{stories_pte}", "--draft-tokens", "3", *BENCH, "--json")
    assert rc == 0, err
    (args,) = calls
    spec = args[args.index("--draft") + 1]
    assert isinstance(spec, Remote) and spec == f"lookup,$HOME/.cache/edgectl/store/{_sha(stories_pte)}.pte"
    rows = json.loads(out)["rows"]
    assert [r["device"]["name"] for r in rows] == ["here"] * 3 + ["board"] * 3
    assert [r["options"] for r in rows[:3]] == [r["options"] for r in rows[3:]]
    assert rows[2]["options"]["draft"] == str(stories_pte.resolve()) and rows[1]["options"]["draft"] == "lookup"
    for a, b in zip(rows[:3], rows[3:]):
        assert a["status"] == b["status"] == "ok"
        assert a["runs"][0]["output_sha256"] == b["runs"][0]["output_sha256"]
    assert rows[5]["summary"]["acceptance"]["mean"] >= 0  # speculative figures came back from the device
    assert (home / ".cache" / "edgectl" / "store" / f"{_sha(stories_pte)}.pte").is_file()


def test_draft_specs_name_the_sent_artifacts(tmp_path):
    """On a real device the local path does not exist: a sent draft must be named by its store path,
    which the device's shell expands ($HOME), beside specs that go as they are."""
    import pytest

    from edgectl.device.remote_bench import _drafts_as_sent
    from edgectl.device.remote_run import Remote, quote
    from edgectl.util.errors import EdgectlError

    d = tmp_path / "draft.pte"
    d.write_bytes(b"x")
    sent = {d.resolve(): Remote("$HOME/.cache/edgectl/store/ab.pte")}
    out = _drafts_as_sent(["--repeat", "1", "--draft", f"lookup:3,{d},8da4w"], sent)
    assert out[:3] == ["--repeat", "1", "--draft"] and isinstance(out[3], Remote)
    assert out[3] == "lookup:3,$HOME/.cache/edgectl/store/ab.pte,8da4w"
    assert quote(out[2:]) == '--draft "lookup:3,$HOME/.cache/edgectl/store/ab.pte,8da4w"'
    assert _drafts_as_sent(["--draft", "lookup"], sent) == ["--draft", "lookup"]
    with pytest.raises(EdgectlError, match="cannot take"):
        _drafts_as_sent(["--draft", f'{d},a"b'], sent)
