"""`kawai run` and `kawai chat` as a user runs them: a subprocess on the real SmolLM2-135M model."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

SMOLLM_ID = "smollm2-135m-instruct-q4_1"


def kawai(*args: str, stdin: str | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-P", "-m", "kawai.api.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_run_streams_an_answer_and_reports_speeds(smollm_model_path):
    result = kawai("run", "-m", SMOLLM_ID, "--temperature", "0", "--max-tokens", "16", "--threads", "1",
                   "What is 2+2? Answer with just the number.")
    assert result.returncode == 0, result.stderr
    assert "4" in result.stdout
    err = result.stderr
    assert f"model: {SMOLLM_ID} (llama" in err
    assert re.search(r"^load time: \d+\.\d\d s$", err, re.M)
    assert re.search(r"^kernel compile time: \d+\.\d\d s$", err, re.M)
    prompt = re.search(r"^prompt: (\d+) tokens, \d+\.\d\d s, (\d+\.\d) tokens/s$", err, re.M)
    gen = re.search(r"^generation: (\d+) tokens, \d+\.\d\d s, (\d+\.\d) tokens/s \(finish: (\w+)\)$", err, re.M)
    assert prompt and gen, err
    assert int(prompt.group(1)) > 10 and float(prompt.group(2)) > 0
    assert 1 <= int(gen.group(1)) <= 16 and gen.group(3) in ("eos", "max_tokens")


def test_run_raw_prompt_from_stdin_with_a_stop_string(smollm_model_path):
    result = kawai("run", "-m", str(smollm_model_path), "--raw", "--temperature", "0", "--max-tokens", "40",
                   "--threads", "1", "--stop", " ", "-", stdin="Monday, Tuesday, Wednesday")
    assert result.returncode == 0, result.stderr
    # Raw: the prompt is the text's own few tokens, no chat template around it.
    assert int(re.search(r"^prompt: (\d+) tokens", result.stderr, re.M).group(1)) < 10
    # The answer ends before the first space (the stop string), which is never printed.
    assert " " not in result.stdout and result.stdout.endswith("\n")
    assert "(finish: stop_sequence)" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (("run", "-m", "no-such-model", "hi"), "model 'no-such-model' not found"),
        (("run", "-m", "/nonexistent/dir/model.gguf", "hi"), "'/nonexistent/dir/model.gguf'"),
        (("run", "--temperature", "5", "hi"), "temperature"),
        (("run", "--max-tokens", "-1", "hi"), "max_tokens"),
        (("run", "--raw", "--system", "x", "hi"), "--system"),
        (("run", "   "), "empty"),
        (("chat", "-m", "no-such-model"), "not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(args, message):
    result = kawai(*args, timeout=60)
    assert result.returncode == 1
    line = one_error_line(result)
    assert line.startswith("kawai: ") and message in line
    assert result.stdout == ""


def test_not_a_gguf_file(tmp_path):
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"NOPE" + bytes(60))
    result = kawai("run", "-m", str(bogus), "hi", timeout=60)
    assert result.returncode == 2 and "invalid GGUF file" in one_error_line(result)


def test_chat_keeps_the_cache_between_turns(smollm_model_path):
    turns = "What is 2+2? Answer with just the number.\nAnd 3+3?\n/reset\nAnd 3+3?\n/exit\nnever read\n"
    result = kawai("chat", "-m", str(smollm_model_path), "--temperature", "0", "--max-tokens", "24",
                   "--threads", "1", stdin=turns)
    assert result.returncode == 0, result.stderr
    stats = re.findall(
        r"^\[prompt: (\d+) new \+ (\d+) cached tokens, .* s; answer: (\d+) tokens, .*finish: (\w+)\]",
        result.stderr,
        re.M,
    )
    assert len(stats) == 3, result.stderr
    (new1, cached1, answer1, finish1), (new2, cached2, _, _), (new3, cached3, _, _) = [
        (int(a), int(b), int(c), d) for a, b, c, d in stats
    ]
    assert cached1 == 0 and new1 > 10
    # Turn 2 reuses turn 1's prompt and answer (all but its last token, which was never fed): only the
    # new user turn is prefilled.
    assert finish1 == "eos" and cached2 == new1 + answer1 - 1
    assert new2 < 20
    assert cached3 == 0 and new3 < new1  # after /reset: a fresh, shorter conversation
    assert "(new conversation)" in result.stderr
    assert "4" in result.stdout


def test_chat_ctrl_c_stops_the_answer_not_the_program(smollm_model_path):
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "kawai.api.cli", "chat", "-m", str(smollm_model_path), "--temperature", "0",
         "--max-tokens", "300", "--threads", "1"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        proc.stdin.write("Write a long story about a dragon who learns to cook.\n")
        proc.stdin.flush()
        first = proc.stdout.read(1)  # the answer has started streaming
        assert first
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate("What is 2+2? Answer with just the number.\n/exit\n", timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    finishes = re.findall(r"finish: (\w+)\]", err)
    assert finishes == ["cancelled", "eos"], err
    assert "(stopped)" in err and "Traceback" not in err
