"""`kawai serve` as a real subprocess on a tiny model: first-run token, clean errors, SIGTERM drains."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from kawai.api.commands.serve import FIRST_TOKEN_FILE, _first_token
from kawai.api.state import ServerSettings
from kawai.api.api_keys import TokenStore
from api_harness import free_port, parse_sse
from sse_grammar import check_stream
from tiny_models import write_tiny_model

ROOT = Path(__file__).resolve().parents[2]


def kawai(*args: str, home: Path) -> subprocess.Popen:
    env = {**os.environ, "KAWAI_HOME": str(home), "KAWAI_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-P", "-m", "kawai.api.cli", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_first_start_creates_one_token_and_prints_it_once(tmp_path, capsys, monkeypatch):
    settings = ServerSettings(home=tmp_path)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # a terminal: the token is shown there
    _first_token(settings)
    printed = capsys.readouterr().out
    secret = next(word for word in printed.split() if word.startswith("kawai-"))
    assert not (tmp_path / FIRST_TOKEN_FILE).exists()
    (rec,) = TokenStore(tmp_path).list()
    assert set(rec.endpoints) == {"messages", "count_tokens", "models", "chat_completions"}
    assert TokenStore(tmp_path).authenticate(secret).id == rec.id
    _first_token(settings)
    assert capsys.readouterr().out == "" and len(TokenStore(tmp_path).list()) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["serve", "-m", "/nonexistent/model.gguf"], "does not exist"),
        (["serve", "-m", "no-such-model-id"], "not found"),
        (["serve", "--port", "0"], "--port"),
        (["serve", "--queue-size", "0"], "--queue-size"),
        (["serve", "--alias", "claude-*"], "--alias must be PATTERN=ID"),
        (["serve", "--ray", "--replicas", "0"], "--replicas"),
        (["serve", "--ray", "--replica-threads", "0"], "--replica-threads"),
    ],
)
def test_bad_arguments_are_one_clear_line(tmp_path, args, message):
    p = kawai(*args, home=tmp_path)
    out, err = p.communicate(timeout=60)
    assert p.returncode != 0 and message in err and "Traceback" not in err


def test_an_alias_to_a_model_not_served_is_one_clear_line(tmp_path):
    model = write_tiny_model(tmp_path, "qwen2", n_ctx=64)
    p = kawai("serve", "--no-auth", "-m", str(model), "--alias", "claude-*=qwen-elsewhere", home=tmp_path / "home")
    out, err = p.communicate(timeout=180)
    assert p.returncode != 0 and "--alias claude-*=qwen-elsewhere: no model 'qwen-elsewhere'" in err
    assert "Traceback" not in err


def test_ray_without_the_extra_is_one_clear_line(tmp_path):
    """`--ray` where Ray is not installed (hidden here, installed or not): the fix, not a traceback."""
    model = write_tiny_model(tmp_path / "tiny.gguf", "qwen2")
    env = {**os.environ, "KAWAI_HOME": str(tmp_path), "KAWAI_THREADS": "1"}
    code = "import sys; sys.modules['ray'] = None; from kawai.api.cli import main; sys.exit(main(sys.argv[1:]))"
    p = subprocess.run([sys.executable, "-P", "-c", code, "serve", "--ray", "--no-auth", "-m", str(model)],
                       cwd=ROOT, env=env, text=True, capture_output=True, timeout=120)
    assert p.returncode != 0 and "pip install 'kawai[ray]'" in p.stderr and "Traceback" not in p.stderr


def test_serve_prints_token_serves_and_drains_on_sigterm(tmp_path):
    model = write_tiny_model(tmp_path, "qwen2", n_ctx=512)
    port = free_port()
    p = kawai("serve", "-m", str(model), "--port", str(port), "--queue-size", "2", home=tmp_path / "home")
    try:
        token_file = tmp_path / "home" / FIRST_TOKEN_FILE  # stdout is a pipe: the token goes to a 0600 file
        deadline = time.monotonic() + 180
        while True:
            line = p.stdout.readline()
            assert line or p.poll() is None, p.stderr.read()
            if str(token_file) in line:
                break
            assert time.monotonic() < deadline
        token = token_file.read_text().strip()
        assert token.startswith("kawai-") and token not in line and token_file.stat().st_mode & 0o777 == 0o600
        url = f"http://127.0.0.1:{port}"
        while True:  # the token is printed before the model loads
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read()
            time.sleep(0.2)

        result: dict = {}

        def long_stream():
            body = {"model": model.stem, "max_tokens": 300, "temperature": 0, "stream": True,
                    "messages": [{"role": "user", "content": "Hi"}]}
            r = httpx.post(url + "/v1/messages", json=body, headers={"x-api-key": token}, timeout=120)
            result["frames"] = parse_sse(r.text)

        client = threading.Thread(target=long_stream)
        client.start()
        time.sleep(0.5)  # the stream is running
        p.send_signal(signal.SIGTERM)
        client.join(timeout=120)
        assert p.wait(timeout=60) == 0
        message = check_stream(result["frames"])  # drained: the in-flight stream finished
        assert message["usage"]["output_tokens"] == 300
        logs = p.stderr.read()
        assert "kernels warmed" in logs and "serving " + model.stem in logs
        assert token not in logs
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
