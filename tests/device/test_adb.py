"""`--device adb:SERIAL` (edgectl/device/adb.py, android.py) with STAND-INS, since no phone is
reachable here: tests/device/standins/adb (a stand-in for Android's adb, first on PATH) and
tests/device/standins/llama_main (a stand-in for ExecuTorch's llama_main that runs
ExecuTorch's own stock runner, TextLLMRunner, through its Python binding, with llama_main's
flags and statistics line).

Fast tests: the stand-in adb maps the phone onto a local directory (its /data/local/tmp is
tmp_path/phone/data/local/tmp) and runs the stand-in llama_main here (x86). Then the emulated
aarch64 board (skips where it is not built): the stand-in adb maps push/shell/pull onto it
over ssh, and ExecuTorch's stock runner code runs on aarch64. Emulated: no timing means anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from helpers import default_sigint
from edgectl.cli.main import main
from edgectl.device import adb
from edgectl.device.android import Output, bench_android, figures, run_android
from edgectl.device.target import parse_target
from edgectl.util.errors import EdgectlError, UsageError

STANDINS = REPO / "tests" / "device" / "standins"
LLAMA_MAIN = STANDINS / "llama_main"  # the stand-in runner
PROMPT = "Once upon a time"
TARGET = parse_target("adb:standin-0")
PHONE_STORE = "data/local/tmp/edgectl/store"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def android_pte(tmp_path_factory, stories_dir) -> Path:
    """stories260K through `edgectl export --target android` (a stock-interface .pte, its
    SentencePiece tokenizer file beside it)."""
    out = tmp_path_factory.mktemp("android") / "stories.pte"
    assert main(["export", str(stories_dir), "-o", str(out), "--target", "android", "--max-seq-len", "256"]) in (0, None)
    assert out.with_name("stories.tokenizer.model").is_file()
    return out


@pytest.fixture
def phone(tmp_path, monkeypatch) -> Path:
    """The stand-in adb first on PATH, its phone a local directory; returns that directory."""
    root = tmp_path / "phone"
    root.mkdir()
    monkeypatch.setenv("PATH", f"{STANDINS}:{os.environ['PATH']}")
    monkeypatch.setenv("EDGECTL_ADB_STANDIN_ROOT", str(root))
    monkeypatch.setenv("EDGECTL_ADB_STANDIN_PATH", str(Path(sys.executable).parent))  # python3 with executorch
    monkeypatch.setenv("EDGECTL_ADB_STANDIN_SERIALS", "standin-0,locked=unauthorized,cable=offline")
    monkeypatch.delenv("EDGECTL_ADB_STANDIN_SSH_CONFIG", raising=False)
    return root


def _run(capsys, pte: Path, runner: Path | None = LLAMA_MAIN, **kw) -> tuple[int, str, str]:
    args = dict(prompt=PROMPT, n=16, temperature=0.0, top_p=1.0, seed=None, chat=False, system=None,
                threads=None, json_out=False, runner=runner)
    args.update(kw)
    rc = run_android(TARGET, pte, **args)
    out, err = capsys.readouterr()
    return rc, out, err


def _local_text(pte: Path) -> str:
    from edgectl.runtime.run import run_prompt

    return run_prompt(pte, PROMPT, max_new_tokens=16, temperature=0.0)["text"]


# -- export --target android ------------------------------------------------------------


def test_export_target_android(android_pte, capsys, tmp_path, stories_dir):
    from edgectl.formats.ptefile import constant_bytes

    assert json.loads(constant_bytes(android_pte, "edgectl_meta"))["interface"] == "stock"
    for bad in (["--target", "android", "--interface", "edgectl"], ["--target", "android", "--backend", "portable"],
                ["--target", "ios"]):
        assert main(["export", str(stories_dir), "-o", str(tmp_path / "x.pte"), *bad]) == 2, bad
    err = capsys.readouterr().err
    assert "--interface stock, not edgectl" in err and "not portable" in err and "choose host or android" in err
    assert not (tmp_path / "x.pte").exists()


# -- the stand-in phone in a local directory -----------------------------------------------


def test_first_run_pushes_second_pushes_nothing(capsys, phone, android_pte):
    rc, out, err = _run(capsys, android_pte)
    assert rc == 0, err
    assert err.count("pushing ") == 3 and "on device already" not in err  # llama_main, .pte, tokenizer
    assert out == _local_text(android_pte) + "\n"  # the runner's text, as edgectl's own run gives it
    assert "5 prompt tokens, 16 new (length)" in err
    store = phone / PHONE_STORE
    assert (store / f"{_sha(android_pte)}.pte").read_bytes() == android_pte.read_bytes()
    tok = android_pte.with_name("stories.tokenizer.model")
    assert (store / f"{_sha(tok)}.model").read_bytes() == tok.read_bytes()
    assert (phone / "data/local/tmp/edgectl/bin/llama_main").read_bytes() == LLAMA_MAIN.read_bytes()
    assert os.access(phone / "data/local/tmp/edgectl/bin/llama_main", os.X_OK)
    rc, out2, err = _run(capsys, android_pte)
    assert rc == 0 and out2 == out
    assert "pushing" not in err and err.count("on device already") == 3
    rc, out3, err = _run(capsys, android_pte, runner=None)  # the runner already there
    assert rc == 0 and out3 == out
    assert sorted(p.name for p in store.iterdir()) == sorted([f"{_sha(android_pte)}.pte", f"{_sha(tok)}.model"])


def test_json_out(capsys, phone, android_pte):
    rc, out, err = _run(capsys, android_pte, json_out=True)
    assert rc == 0, err
    res = json.loads(out)
    assert res["text"] == _local_text(android_pte) and res["device"] == "adb:standin-0"
    s = res["stats"]
    assert (s["prompt_tokens"], s["new_tokens"], s["stopped"]) == (5, 16, "length")
    assert {"ttft_ms", "prefill_tok_s", "decode_tok_s", "prefill_ms", "decode_ms"} <= set(s)
    assert res["runner_stats"]["generated_tokens"] == 15 and res["emulated"] is False


def test_bench(capsys, phone, android_pte):
    res = bench_android(TARGET, android_pte, prompt_tokens=24, new_tokens=8, repeat=2, threads=1, runner=LLAMA_MAIN)
    d = res["device"]
    assert d["name"] == "edgectl adb stand-in" and d["cores"] >= 1 and d["mem_total_bytes"] > 0 and d["cpu"]
    assert len(res["runs"]) == 2
    for run in res["runs"]:
        assert run["prompt_tokens"] == 24 and run["new_tokens"] == 8
        for k in ("load_ms", "ttft_ms", "prefill_ms", "decode_ms", "first_token_ms"):
            assert run[k] >= 0, k
        _check_rates(run)
        assert run["peak_rss"] is None and run["emulated"] is False


def _check_rates(run: dict) -> None:
    """A rate follows from its span, and is None exactly when the span read 0 ms (too short to time)."""
    gen = run["runner_stats"]["generated_tokens"]
    for rate, ms, n in (("prefill_tok_s", "prefill_ms", run["prompt_tokens"]), ("decode_tok_s", "decode_ms", gen)):
        if run[ms] == 0:
            assert run[rate] is None, rate
        else:
            assert run[rate] == pytest.approx(n / run[ms] * 1e3), rate


def test_chat_is_formatted_here(capsys, phone, android_pte, monkeypatch):
    """llama_main has no chat template: the model's own is applied here and the formatted
    text (several lines, quotes) is the runner's prompt, read as the same tokens there."""
    from edgectl.device import android
    from edgectl.runtime.run import artifact_tokenizer

    tok = artifact_tokenizer(android_pte)
    tok.config["chat_template"] = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                                   "{% if add_generation_prompt %}assistant:{% endif %}")
    monkeypatch.setattr(android, "_tokenizer", lambda artifact: tok)
    rc, out, err = _run(capsys, android_pte, chat=True, system="Tell 'short' \"stories\".", json_out=True)
    assert rc == 0, err
    text = tok.apply_chat_template([{"role": "system", "content": "Tell 'short' \"stories\"."},
                                    {"role": "user", "content": PROMPT}])
    assert json.loads(out)["stats"]["prompt_tokens"] == len(tok.encode(text, bos=False))
    assert "read the prompt as" not in err


def test_interrupted_push_resumes(capsys, phone, tmp_path):
    f = tmp_path / "m.pte"
    f.write_bytes(os.urandom(300_000))
    part = phone / PHONE_STORE / f"{_sha(f)}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(f.read_bytes()[:100_000])
    assert adb.send(TARGET, f) == f"/data/local/tmp/edgectl/store/{_sha(f)}.pte"
    assert "resuming at 0.1 MB" in capsys.readouterr().err
    assert (phone / PHONE_STORE / f"{_sha(f)}.pte").read_bytes() == f.read_bytes() and not part.exists()
    assert not list((phone / PHONE_STORE).glob("*.rest"))


def test_damaged_part_is_detected_and_removed(capsys, phone, tmp_path):
    f = tmp_path / "m.pte"
    f.write_bytes(os.urandom(50_000))
    part = phone / PHONE_STORE / f"{_sha(f)}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\xff" * 20_000)
    with pytest.raises(EdgectlError, match="arrived damaged on adb:standin-0.*partial file is removed"):
        adb.send(TARGET, f)
    assert list((phone / PHONE_STORE).iterdir()) == []
    adb.send(TARGET, f)  # afresh
    assert (phone / PHONE_STORE / f"{_sha(f)}.pte").read_bytes() == f.read_bytes()


def test_changed_runner_is_pushed_again(capsys, phone, tmp_path):
    r = tmp_path / "llama_main"
    r.write_text("#!/bin/sh\necho one\n")
    adb.ensure_runner(TARGET, r)
    assert adb.ensure_runner(TARGET, r) == adb.RUNNER
    assert capsys.readouterr().err.count("pushing") == 1
    r.write_text("#!/bin/sh\necho two\n")
    adb.ensure_runner(TARGET, r)
    assert "pushing llama_main" in capsys.readouterr().err
    assert adb.shell(TARGET, adb.RUNNER).stdout == "two\n"


def test_adb_errors(capsys, phone, android_pte, monkeypatch):
    for serial, words in (("R58M", "no device 'R58M'"), ("locked", "is unauthorized"), ("cable", "is offline")):
        with pytest.raises(EdgectlError, match=words) as e:
            run_android(parse_target(f"adb:{serial}"), android_pte, prompt="x", n=2, temperature=0.0, top_p=1.0,
                        seed=None, chat=False, system=None, threads=None, json_out=False, runner=LLAMA_MAIN)
        assert "\n" not in str(e.value) and e.value.hint
    with pytest.raises(EdgectlError, match="no llama_main on adb:standin-0") as e:
        _run(capsys, android_pte, runner=None)
    assert "ANDROID_ABI=arm64-v8a" in e.value.hint and "--runner" in e.value.hint
    assert not (phone / PHONE_STORE).exists() or not any((phone / PHONE_STORE).glob("*.pte"))  # nothing pushed first
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    with pytest.raises(EdgectlError, match="no adb on this machine") as e:
        _run(capsys, android_pte)
    assert "apt install adb" in e.value.hint


def test_usage_errors(capsys, phone, android_pte, stories_pte, tmp_path):
    with pytest.raises(UsageError, match="needs the stock interface"):
        _run(capsys, stories_pte)  # an edgectl-interface program
    with pytest.raises(UsageError, match="--seed is not supported with adb"):
        _run(capsys, android_pte, seed=1)
    with pytest.raises(UsageError, match="top-p 0.9"):
        _run(capsys, android_pte, temperature=0.7, top_p=0.5)
    with pytest.raises(EdgectlError, match="no chat template"):  # stories260K has none; applied here, not by llama_main
        _run(capsys, android_pte, chat=True)
    lone = tmp_path / "lone.pte"
    lone.write_bytes(android_pte.read_bytes())
    with pytest.raises(EdgectlError, match="no tokenizer file beside"):
        _run(capsys, lone)
    with pytest.raises(UsageError, match="shard sets do not run on Android"):
        _run(capsys, tmp_path)
    with pytest.raises(UsageError, match="fills the program's 256 positions"):
        _run(capsys, android_pte, prompt="Once upon a time " * 80)
    with pytest.raises(UsageError, match=r"\(266\) exceed the program's 256 positions"):
        bench_android(TARGET, android_pte, prompt_tokens=250, new_tokens=16, repeat=1, threads=None, runner=LLAMA_MAIN)
    assert list(phone.iterdir()) == []  # refused before anything was pushed


def test_runner_failure_is_one_line(capsys, phone, android_pte, tmp_path):
    bad = tmp_path / "llama_main"
    bad.write_text("#!/bin/sh\necho 'I starting' >&2\necho 'E main.cpp] Failed to create llama runner: "
                   "device not found' >&2\nexit 1\n")  # the runner's words, not adb's
    with pytest.raises(EdgectlError, match=r"llama_main failed on adb:standin-0 \(exit 1\): E main.cpp\] Failed to create"):
        _run(capsys, android_pte, runner=bad)


def test_ctrl_c_stops_the_phones_runner(phone, android_pte, tmp_path):
    """SIGINT to the local process: it stops, and so does the runner on the phone (by its pid)."""
    slow = tmp_path / "llama_main"
    slow.write_text(f"#!/bin/sh\necho $$ > {tmp_path}/runner.pid\nprintf started.\nexec sleep 60\n")
    slow.chmod(0o755)
    code = ("import sys; from pathlib import Path; from edgectl.device.android import run_android; "
            "from edgectl.device.target import parse_target; "
            f"run_android(parse_target('adb:standin-0'), Path({str(android_pte)!r}), prompt='x', n=2, temperature=0.0, "
            f"top_p=1.0, seed=None, chat=False, system=None, threads=None, json_out=False, runner=Path({str(slow)!r}))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=os.environ.copy(),
                            preexec_fn=default_sigint)
    assert proc.stdout.read(8) == b"started."  # streamed as produced
    pid = int((tmp_path / "runner.pid").read_text())
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) != 0
    for _ in range(100):
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z":
                break
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the phone's runner (pid {pid}) is still running")


# -- llama_main's output, parsed --------------------------------------------------------


def test_output_stream_in_any_pieces():
    stats = {"prompt_tokens": 5, "generated_tokens": 3, "model_load_start_ms": 100, "model_load_end_ms": 150,
             "inference_start_ms": 160, "prompt_eval_end_ms": 200, "first_token_ms": 200, "inference_end_ms": 230}
    raw = f"Hi there, one\ntwo</s>\n\nPyTorchObserver {json.dumps(stats)}\n"
    for step in (1, 2, 3, 7, len(raw)):
        shown: list[str] = []
        out = Output("Hi there", shown.append, ("</s>",))
        for i in range(0, len(raw), step):
            out.feed(raw[i:i + step])
        assert out.finish() == ", one\ntwo" == "".join(shown)
        assert out.stats == stats
    f = figures(stats)
    assert (f["prompt_tokens"], f["new_tokens"], f["load_ms"], f["ttft_ms"]) == (5, 4, 50.0, 40.0)
    assert (f["prefill_ms"], f["decode_ms"], f["first_token_ms"]) == (40.0, 30.0, 100.0)
    assert f["prefill_tok_s"] == 125.0 and f["decode_tok_s"] == 100.0
    # a span the runner's millisecond stamps read as 0 ms has no rate: not 0 tok/s, not infinite
    quick = figures({**stats, "inference_end_ms": stats["prompt_eval_end_ms"]})
    assert quick["decode_ms"] == 0.0 and quick["decode_tok_s"] is None and quick["prefill_tok_s"] == 125.0


def test_output_text_that_looks_like_stats():
    shown: list[str] = []
    out = Output("p", shown.append)
    out.feed("p PyTorchObserver is a name\nPyTorch rocks\nPyTorchObserver {not json}\n")
    assert out.finish() == " PyTorchObserver is a name\nPyTorch rocks\nPyTorchObserver {not json}" and out.stats is None


# -- the emulated aarch64 board ----------------------------------------------------------

from test_arm64_board import BOARD, board  # noqa: E402,F401  (the fixture: starts/stops the board)

BOARD_PHONE = "/var/tmp/edgectl-adb-standin-test"  # the stand-in phone's directory in the board


@pytest.mark.arm64
def test_board_run_and_bench(capsys, board, android_pte, monkeypatch):  # noqa: F811
    """The stand-in adb maps the phone onto the board; the stand-in llama_main runs ExecuTorch's
    stock runner there (aarch64): its greedy text is the text of the same runner run here (x86)
    on the same .pte and of edgectl's own run; a second run pushes nothing; bench's figures."""
    board(f"rm -rf {BOARD_PHONE}")
    monkeypatch.setenv("PATH", f"{STANDINS}:{os.environ['PATH']}")
    monkeypatch.setenv("EDGECTL_ADB_STANDIN_SSH_CONFIG", str(BOARD / "ssh_config"))
    monkeypatch.setenv("EDGECTL_ADB_STANDIN_BOARD_DIR", BOARD_PHONE)
    monkeypatch.delenv("EDGECTL_ADB_STANDIN_ROOT", raising=False)
    monkeypatch.delenv("EDGECTL_ADB_STANDIN_SERIALS", raising=False)
    tok = android_pte.with_name("stories.tokenizer.model")
    here = subprocess.run([sys.executable, str(LLAMA_MAIN), f"--model_path={android_pte}", f"--tokenizer_path={tok}",
                           f"--prompt={PROMPT}", "--max_new_tokens=16", "--temperature=0", "--num_bos=1"],
                          capture_output=True, text=True, timeout=300)
    assert here.returncode == 0, here.stderr
    x86_text = here.stdout.split("\nPyTorchObserver ")[0][len(PROMPT):]
    rc, out, err = _run(capsys, android_pte)
    sys.__stderr__.write(f"\nfirst run stderr:\n{err}")
    assert rc == 0, err
    assert err.count("pushing ") == 3
    assert out == x86_text + "\n" == _local_text(android_pte) + "\n"
    sha = _sha(android_pte)
    assert board(f"sha256sum {BOARD_PHONE}/data/local/tmp/edgectl/store/{sha}.pte").split()[0] == sha
    rc, out2, err = _run(capsys, android_pte, runner=None)
    sys.__stderr__.write(f"second run stderr:\n{err}")
    assert rc == 0 and out2 == out
    assert "pushing" not in err and err.count("on device already") == 2  # and llama_main found there
    assert "(llama_main, emulated)" in err
    res = bench_android(TARGET, android_pte, prompt_tokens=12, new_tokens=6, repeat=1, threads=None, runner=None)
    sys.__stderr__.write(f"bench: {json.dumps(res)}\n")
    d = res["device"]
    assert d["emulated"] is True and d["cpu"] == "Cortex-A76" and d["machine"] == "aarch64" and d["cores"] >= 1
    (run,) = res["runs"]
    assert run["prompt_tokens"] == 12 and run["new_tokens"] == 6 and run["emulated"] is True
    assert run["load_ms"] >= 0
    _check_rates(run)
    board(f"rm -rf {BOARD_PHONE}")


# -- the CLI: run and bench --device adb:SERIAL -----------------------------------------


def test_cli_run_and_bench(capsys, phone, android_pte):
    """`edgectl run/bench --device adb:SERIAL --runner PATH` reach the same code as above,
    and bench's rows carry the phone and merge with local ones."""
    def cli(*argv):
        rc = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return rc, out, err

    rc, out, err = cli("run", android_pte, "--device", "adb:standin-0", "--runner", LLAMA_MAIN, "-p", PROMPT, "-n", "16")
    assert rc == 0, err
    assert out.strip() == _local_text(android_pte).strip()
    rc, out, err = cli("bench", android_pte, "--device", "local", "--device", "adb:standin-0", "--runner", LLAMA_MAIN,
                       "--repeat", "1", "--prompt-tokens", "12", "--new-tokens", "4", "--json")
    assert rc == 0, err
    rows = json.loads(out)["rows"]
    assert [r["device"]["name"] for r in rows] == ["here", "edgectl adb stand-in"]
    assert rows[0]["artifact"] == rows[1]["artifact"] == str(android_pte.resolve())
    (run,) = rows[1]["runs"]
    assert run["new_tokens"] == 4
    _check_rates(run)
    decode = rows[1]["summary"]["decode_tok_s"]
    assert (decode is None) == (run["decode_ms"] == 0) and (decode is None or decode["mean"] == run["decode_tok_s"])
    assert rows[1]["summary"]["peak_rss"] is None  # llama_main reports no peak
    rc, out, err = cli("run", android_pte, "--device", "adb:standin-0", "-p", "x", "--memory-budget", "300MB")
    assert rc == 2 and "--memory-budget is not supported with adb: devices" in err
    rc, out, err = cli("run", android_pte, "-p", "x", "--runner", LLAMA_MAIN)
    assert rc == 2 and "--runner needs --device adb:SERIAL" in err


def test_device_clean_empties_the_phones_store(capsys, phone, android_pte):
    """`device clean adb:` removes the pushed .pte and tokenizer; llama_main in bin/ stays."""
    assert _run(capsys, android_pte)[0] == 0
    store = phone / "data" / "local" / "tmp" / "edgectl" / "store"
    assert len(list(store.iterdir())) == 2
    assert main(["device", "clean", "adb:standin-0", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["files"] == 2 and res["bytes"] >= android_pte.stat().st_size and res["removed"] is True
    assert not store.exists() and (phone / "data" / "local" / "tmp" / "edgectl" / "bin" / "llama_main").is_file()
    assert main(["device", "clean", "adb:nosuch"]) == 1
