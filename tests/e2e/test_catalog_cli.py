"""`kawai pull`, `kawai models` and `kawai inspect` through the real command-line entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kawai.api.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("KAWAI_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _kawai(*args: str, env_home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "KAWAI_HOME": str(env_home)}
    return subprocess.run([sys.executable, "-P", "-m", "kawai.api.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


MALFORMED = {
    "empty": b"",
    "tensor-count": b"GGUF\x03\x00\x00\x00" + (2**63).to_bytes(8, "little") + bytes(8),
    "key-length": b"GGUF\x03\x00\x00\x00" + bytes(8) + (1).to_bytes(8, "little")
                  + (2**62).to_bytes(8, "little") + b"k" * 16,
    "not-gguf": b"PK\x03\x04 a zip, not a model",
}


def test_inspect_malformed_file_in_a_real_process_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(MALFORMED["key-length"])
    proc = _kawai("inspect", str(bad), env_home=tmp_path / "home")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith("kawai: invalid GGUF file: metadata key #0: length 4611686018427387904")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("content", MALFORMED.values(), ids=MALFORMED.keys())
def test_inspect_malformed_file_exits_2_with_one_line(home, tmp_path, capsys, content):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    assert main(["inspect", str(bad)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("kawai: invalid GGUF file: ") and err.count("\n") == 1


def test_inspect_real_model_by_path(smollm_model_path, home, capsys):
    assert main(["inspect", str(smollm_model_path)]) == 0
    out = capsys.readouterr().out
    for expected in ("architecture         llama", "quantization         Q4_1", "vocab size           49152",
                     "context length       8192", "layers               30", "heads                9",
                     "kv heads             3", "rope base            100000.0", "chat template        yes",
                     "272 tensors"):
        assert expected in out, expected
    assert "token_embd.weight          Q8_0  49152 x 576  30081024" in out
    table = out.split("TENSOR", 1)[1].strip().splitlines()[1:]
    assert len(table) == 272


def test_inspect_default_model_by_id(default_model_path, capsys):
    assert main(["inspect", "qwen2.5-coder-0.5b-instruct-q4_k_m", "--metadata"]) == 0
    out = capsys.readouterr().out
    assert "architecture         qwen2" in out and "Q4_K_M" in out and "291 tensors" in out
    assert "tokenizer.ggml.tokens" in out and "STRING[151936]" in out
    assert "output.weight" in out


def test_inspect_unknown_id(home, capsys):
    assert main(["inspect", "no-such-model"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kawai: model 'no-such-model' not found") and err.count("\n") == 1


def test_models_pull_path_then_models(home, smollm_model_path, capsys):
    assert main(["models"]) == 0
    assert "no local models" in capsys.readouterr().out
    assert main(["pull", str(smollm_model_path), "--id", "smol", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == "smol: ready (llama, Q4_1, 93.8 MiB)"
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "SIZE", "ARCH", "QUANT", "CONTEXT"]
    assert lines[1].split() == ["smol", "93.8", "MiB", "llama", "Q4_1", "8192"]
    assert main(["models", "--catalog"]) == 0
    out = capsys.readouterr().out
    assert "qwen2.5-coder-1.5b-instruct-q4_k_m" in out and "1.0 GiB" in out


def test_pull_errors_are_one_line(home, tmp_path, capsys):
    assert main(["pull", "nope"]) == 1
    assert main(["pull", str(tmp_path / "x.gguf"), "--sha256", "xyz"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("kawai: model 'nope' not found")
    assert err[1] == "kawai: --sha256 must be 64 hexadecimal characters"
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x01\x00\x00\x00")
    assert main(["pull", str(bad)]) == 2
    assert capsys.readouterr().err.startswith("kawai: invalid GGUF file: version: 1")
