"""The project installs as one import package, `kawai`, and lives beside packages that share its folder names.

`engine/`, `api/` and `kernels/` sit at the repository's top level, but installed they are `kawai.engine`,
`kawai.api` and `kawai.kernels` (pyproject.toml maps them): a wheel claims no generic top-level name, and
Hugging Face's `kernels` (which transformers imports) is never shadowed by ours.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    (path,) = out.glob("kawai-*.whl")
    return path


def test_wheel_installs_only_the_kawai_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"kawai"}
    for module in ("kawai/engine/llm.py", "kawai/api/cli.py", "kawai/kernels/matmul.py",
                   "kawai/engine/vision/encoder.py", "kawai/api/commands/serve.py"):
        assert module in names
    assert not any(n.startswith("kawai/tests/") or "/benchmarks/" in n for n in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "kawai = kawai.api.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_repository_root_is_not_on_sys_path():
    """`make test` runs `python -P -m pytest`: the root's folders must not be importable as top-level names."""
    assert all(Path(p or ".").resolve() != ROOT for p in sys.path)


def test_hugging_face_kernels_is_not_shadowed():
    kernels = pytest.importorskip("kernels")  # transformers >= 5.25 depends on it; the test lock installs it
    assert Path(kernels.__file__).resolve().parent != ROOT / "kernels"
    assert hasattr(kernels, "get_kernel")  # Hugging Face's API, which ours does not have
    import kawai.kernels

    assert Path(kawai.kernels.__file__).resolve().parent == ROOT / "kernels"


def test_transformers_and_our_engine_in_one_process(tmp_path):
    """Both load a model in the same interpreter: transformers imports HF `kernels`, we import `kawai.kernels`."""
    code = """
import transformers, kernels
import pathlib, torch
from tiny_models import write_tiny_model, load_hf_model
from kawai.engine.llm import load
path = pathlib.Path(%r) / "tiny.gguf"
write_tiny_model(path)
hf = load_hf_model(path)
llm = load(path, kv_dtype="f32")  # the float16 default cache moves logits by ~1e-3
ids = [1, 2, 3, 4]
with torch.no_grad():
    ref = hf(torch.tensor([ids])).logits[0].numpy()
ours = llm.logits(ids)
err = abs(ref - ours).max(); print("max abs logit error", err); assert err < 4e-5, err  # measured <= 3.2e-6
assert "site-packages" in kernels.__file__, kernels.__file__
""" % str(tmp_path)
    result = subprocess.run([sys.executable, "-P", "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env={**__import__("os").environ,
                                              "PYTHONPATH": str(ROOT / "tests")})
    assert result.returncode == 0, result.stderr[-2000:]
