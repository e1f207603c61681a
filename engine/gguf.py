"""A from-scratch, memory-mapped GGUF reader that knows nothing about models.

File layout (little-endian; see docs/gguf.md for the byte diagram):

    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x (key: string, value_type u32, value)
    n_tensors x (name: string, n_dims u32, dims u64[n_dims], ggml_type u32, offset u64)
    padding to `general.alignment` (default 32)
    data section: each tensor at data_start + offset

A string is a u64 byte length followed by UTF-8 bytes. An array value is elem_type u32, count u64, then
`count` values (arrays of arrays are rejected here). A bool is one byte, 0 or 1.

Every check follows ../shared/docs/security.md: counts and lengths are compared with the bytes left
*before* anything is allocated or looped over; sizes are Python ints (never wrapping numpy ints); the
parser has no recursion; every failure is a `GGUFError` naming the field and the byte offset.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np

from kawai.kernels.qtypes import GGMLType

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_ALIGNMENT = 1 << 16
MAX_STRING_BYTES = 1 << 24  # 16 MiB: chat templates are the longest strings in real files
MAX_NAME_BYTES = 1 << 16  # metadata keys
MAX_TENSOR_NAME_BYTES = 63  # ggml's GGML_MAX_NAME (64) minus its NUL: llama.cpp rejects longer names
MAX_DIMS = 4
INT64_MAX = (1 << 63) - 1
HEADER_BYTES = 24  # magic + version + n_tensors + n_kv
MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, smallest value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset

_U64 = struct.Struct("<Q")


class GGUFError(ValueError):
    """Any malformed or unsupported GGUF file. The message names the field and the byte offset."""


class GGUFValueType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# struct format and numpy dtype for each fixed-size scalar type. BOOL is read as a byte and checked.
_SCALAR: dict[GGUFValueType, tuple[str, str]] = {
    GGUFValueType.UINT8: ("<B", "<u1"),
    GGUFValueType.INT8: ("<b", "<i1"),
    GGUFValueType.UINT16: ("<H", "<u2"),
    GGUFValueType.INT16: ("<h", "<i2"),
    GGUFValueType.UINT32: ("<I", "<u4"),
    GGUFValueType.INT32: ("<i", "<i4"),
    GGUFValueType.FLOAT32: ("<f", "<f4"),
    GGUFValueType.BOOL: ("<B", "<u1"),
    GGUFValueType.UINT64: ("<Q", "<u8"),
    GGUFValueType.INT64: ("<q", "<i8"),
    GGUFValueType.FLOAT64: ("<d", "<f8"),
}
_INT_TYPES = frozenset(
    {
        GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
        GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64,
    }
)
_FLOAT_TYPES = frozenset({GGUFValueType.FLOAT32, GGUFValueType.FLOAT64})
_MISSING: Any = object()


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry.

    `shape` is in NumPy order (outermost first): GGUF stores dims innermost-first, so a weight matrix
    with dims (n_in, n_out) in the file has shape (n_out, n_in) here, and each of its n_out rows is
    contiguous on disk.
    """

    name: str
    ggml_type: GGMLType
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    n_bytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class MetadataField:
    """A metadata value with its on-disk type (element type too, for arrays)."""

    value: Any  # int | float | bool | str | list[str] | np.ndarray (numeric arrays)
    value_type: GGUFValueType
    element_type: GGUFValueType | None = None


class _Cursor:
    """Reads little-endian values from a buffer, checking every length against the bytes left."""

    def __init__(self, buf: memoryview, size: int):
        self.buf = buf
        self.size = size
        self.pos = 0

    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.left():
            raise GGUFError(f"{what}: needs {n} bytes at offset {self.pos}, only {self.left()} left")

    def scalar(self, vtype: GGUFValueType, what: str) -> Any:
        fmt, _ = _SCALAR[vtype]
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        if vtype == GGUFValueType.BOOL:
            if v > 1:
                raise GGUFError(f"{what}: bool byte {v} at offset {self.pos} is not 0 or 1")
            v = bool(v)
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT64, what)

    def string(self, what: str, cap: int = MAX_STRING_BYTES) -> str:
        start = self.pos
        n = self.u64(f"{what} length")
        if n > cap:
            raise GGUFError(f"{what}: length {n} at offset {start} exceeds the cap of {cap} bytes")
        self.need(n, what)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{what}: invalid UTF-8 at offset {start}") from None

    def value_type(self, what: str) -> GGUFValueType:
        at = self.pos
        t = self.u32(what)
        try:
            return GGUFValueType(t)
        except ValueError:
            raise GGUFError(f"{what}: unknown value type {t} at offset {at}") from None

    def string_array(self, key: str, count: int) -> list[str]:
        """`count` strings. The same checks as `string`, in one tight loop: vocabularies hold 150k+."""
        buf, pos, size = self.buf, self.pos, self.size
        unpack = _U64.unpack_from
        items: list[str] = []
        append = items.append
        i = 0
        try:
            for i in range(count):
                if size - pos < 8:
                    raise GGUFError(f"{key}[{i}] length: needs 8 bytes at offset {pos}, only {size - pos} left")
                (n,) = unpack(buf, pos)
                pos += 8
                if n > MAX_STRING_BYTES or n > size - pos:
                    raise GGUFError(f"{key}[{i}]: length {n} at offset {pos - 8} exceeds the bytes left")
                append(str(buf[pos : pos + n], "utf-8"))
                pos += n
        except UnicodeDecodeError:
            raise GGUFError(f"{key}[{i}]: invalid UTF-8 at offset {pos - 8}") from None
        self.pos = pos
        return items

    def array(self, key: str) -> MetadataField:
        at = self.pos
        etype = self.value_type(f"{key}: array element type")
        count = self.u64(f"{key}: array count")
        if etype == GGUFValueType.ARRAY:
            raise GGUFError(f"{key}: nested arrays are not supported (offset {at})")
        if etype == GGUFValueType.STRING:
            # Each string takes at least its 8-byte length: bound the count before looping.
            if count * 8 > self.left():
                raise GGUFError(f"{key}: array count {count} of strings at offset {at} exceeds the bytes left")
            return MetadataField(self.string_array(key, count), GGUFValueType.ARRAY, etype)
        _, dtype = _SCALAR[etype]
        n_bytes = count * np.dtype(dtype).itemsize  # Python int: cannot wrap
        if n_bytes > self.left():
            raise GGUFError(f"{key}: array count {count} of {etype.name} at offset {at} exceeds the bytes left")
        arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
        if etype == GGUFValueType.BOOL:
            if count and int(arr.max()) > 1:
                raise GGUFError(f"{key}: bool array at offset {at} holds a byte that is not 0 or 1")
            arr = arr.astype(bool)
        self.pos += n_bytes
        return MetadataField(arr, GGUFValueType.ARRAY, etype)


class GGUFFile:
    """An open GGUF file: `metadata` (key -> value), `fields` (key -> MetadataField) and `tensors`
    (name -> TensorInfo), with zero-copy tensor data views over a read-only memory map.

    The map costs no memory until a page is read; pages read once (a tensor repacked at load) can be
    handed back with `release`, and are read again from the OS page cache if touched later."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            try:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # an empty file cannot be mapped
                raise GGUFError(f"header: file is empty, need at least {HEADER_BYTES} bytes (offset 0)") from None
        self._map = np.frombuffer(self._mmap, dtype=np.uint8)  # read-only (file_size,)
        self.version, self.fields, self.tensors, self.data_offset, self.alignment = _parse(self._map)
        self.metadata: dict[str, Any] = {k: f.value for k, f in self.fields.items()}

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    @property
    def file_size(self) -> int:
        return int(self._map.size)

    # Typed metadata access: a wrong type is a GGUFError naming the key, never a silent coercion.
    def get_int(self, key: str, default: Any = _MISSING) -> int:
        return self._typed(key, _INT_TYPES, "an integer", default)

    def get_float(self, key: str, default: Any = _MISSING) -> float:
        """A float or integer value, as a Python float."""
        v = self._typed(key, _FLOAT_TYPES | _INT_TYPES, "a number", default)
        return v if v is default else float(v)

    def get_str(self, key: str, default: Any = _MISSING) -> str:
        return self._typed(key, frozenset({GGUFValueType.STRING}), "a string", default)

    def get_bool(self, key: str, default: Any = _MISSING) -> bool:
        return self._typed(key, frozenset({GGUFValueType.BOOL}), "a bool", default)

    def _typed(self, key: str, types: frozenset, what: str, default: Any) -> Any:
        field = self.fields.get(key)
        if field is None:
            if default is _MISSING:
                raise GGUFError(f"metadata key {key!r} is missing")
            return default
        if field.value_type not in types:
            found = field.value_type.name
            if field.element_type is not None:
                found = f"ARRAY of {field.element_type.name}"
            raise GGUFError(f"metadata key {key!r}: expected {what}, found {found}")
        return field.value

    def tensor_data(self, name: str) -> np.ndarray:
        """Raw bytes of a tensor as a zero-copy uint8 view, shaped (rows, row_bytes)."""
        info = self.tensors[name]
        flat = self._map[info.offset : info.offset + info.n_bytes]
        rows = math.prod(info.shape[:-1]) if len(info.shape) > 1 else 1
        return flat.reshape(rows, info.n_bytes // rows)

    def release(self, name: str) -> None:
        """Drop the resident pages of a tensor's bytes (after they were copied into another layout).
        Views stay valid: a later read faults the pages back in from the page cache."""
        if not hasattr(mmap, "MADV_DONTNEED"):  # not on every platform
            return
        info = self.tensors[name]
        start = info.offset - info.offset % mmap.PAGESIZE
        end = min(info.offset + info.n_bytes, self.file_size)
        if end > start:
            self._mmap.madvise(mmap.MADV_DONTNEED, start, end - start)

    def tensor_array(self, name: str) -> np.ndarray:
        """A float tensor (F32/F16) as a zero-copy typed view in NumPy shape order."""
        info = self.tensors[name]
        dtype = {GGMLType.F32: "<f4", GGMLType.F16: "<f2"}.get(info.ggml_type)
        if dtype is None:
            raise GGUFError(f"tensor {name}: type {info.ggml_type.name} is not a plain float type")
        return self._map[info.offset : info.offset + info.n_bytes].view(dtype).reshape(info.shape)


def _parse(buf: np.ndarray):
    cur = _Cursor(memoryview(buf), int(buf.size))
    cur.need(4, "magic")
    magic = bytes(cur.buf[0:4])
    if magic != GGUF_MAGIC:
        raise GGUFError(f"magic: expected b'GGUF', found {magic!r} at offset 0")
    cur.pos = 4
    version = cur.u32("version")
    if version not in (2, 3):
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        hint = " (a big-endian file: only little-endian is supported)" if swapped in (2, 3) else ""
        raise GGUFError(f"version: {version} at offset 4 is not supported (only 2 and 3){hint}")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")
    # Bound both counts by the smallest possible entry before looping (ints: no wrapping).
    if n_kv * MIN_KV_BYTES > cur.left():
        raise GGUFError(f"metadata count: {n_kv} at offset 16 exceeds what the file can hold")
    if n_kv * MIN_KV_BYTES + n_tensors * MIN_TENSOR_INFO_BYTES > cur.left():
        raise GGUFError(f"tensor count: {n_tensors} at offset 8 exceeds what the file can hold")

    fields: dict[str, MetadataField] = {}
    for i in range(n_kv):
        at = cur.pos
        key = cur.string(f"metadata key #{i}", cap=MAX_NAME_BYTES)
        if not key:
            raise GGUFError(f"metadata key #{i}: empty key at offset {at}")
        if key in fields:
            raise GGUFError(f"metadata key {key!r}: duplicate at offset {at}")
        vtype = cur.value_type(f"{key}: value type")
        if vtype == GGUFValueType.ARRAY:
            fields[key] = cur.array(key)
        elif vtype == GGUFValueType.STRING:
            fields[key] = MetadataField(cur.string(key), vtype)
        else:
            fields[key] = MetadataField(cur.scalar(vtype, key), vtype)

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in fields:
        f = fields["general.alignment"]
        a = f.value
        if f.value_type != GGUFValueType.UINT32 or a == 0 or a & (a - 1) or a > MAX_ALIGNMENT:
            shown = a if f.value_type != GGUFValueType.ARRAY else "an array"
            raise GGUFError(
                f"general.alignment: {shown!r} ({f.value_type.name}) must be a UINT32 power of two "
                f"in 1..{MAX_ALIGNMENT}"
            )
        alignment = int(a)

    raw_infos = []
    names: set[str] = set()
    for i in range(n_tensors):
        at = cur.pos
        name = cur.string(f"tensor #{i} name", cap=MAX_TENSOR_NAME_BYTES)
        if not name:
            raise GGUFError(f"tensor #{i} name: empty name at offset {at}")
        if name in names:
            raise GGUFError(f"tensor {name!r}: duplicate name at offset {at}")
        names.add(name)
        n_dims = cur.u32(f"tensor {name}: n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(f"tensor {name}: n_dims {n_dims} at offset {at} not in 1..{MAX_DIMS}")
        dims = [cur.u64(f"tensor {name}: dim {d}") for d in range(n_dims)]
        if any(d < 1 for d in dims):
            raise GGUFError(f"tensor {name}: dims {dims} contain a zero (offset {at})")
        if math.prod(dims) > INT64_MAX:
            raise GGUFError(f"tensor {name}: element count of dims {dims} overflows int64")
        type_at = cur.pos
        type_id = cur.u32(f"tensor {name}: type")
        try:
            gtype = GGMLType(type_id)
        except ValueError:
            raise GGUFError(f"tensor {name}: unknown ggml type {type_id} at offset {type_at}") from None
        if dims[0] % gtype.block_size:
            raise GGUFError(
                f"tensor {name}: first dim {dims[0]} is not a multiple of {gtype.name} block size "
                f"{gtype.block_size}"
            )
        offset = cur.u64(f"tensor {name}: offset")
        if offset % alignment:
            raise GGUFError(f"tensor {name}: data offset {offset} is not aligned to {alignment}")
        n_bytes = math.prod(dims) // gtype.block_size * gtype.type_size
        # GGUF dims are innermost-first; NumPy shape is outermost-first.
        raw_infos.append((name, gtype, tuple(reversed(dims)), offset, n_bytes))

    data_offset = -(-cur.pos // alignment) * alignment
    data_len = cur.size - data_offset
    if raw_infos and data_len < 0:
        raise GGUFError(f"data section: starts at {data_offset}, past the end of the file ({cur.size})")
    tensors: dict[str, TensorInfo] = {}
    for name, gtype, shape, offset, n_bytes in raw_infos:
        if offset + n_bytes > data_len:
            raise GGUFError(
                f"tensor {name}: offset {offset} + {n_bytes} bytes exceed the data section "
                f"({max(data_len, 0)} bytes at offset {data_offset})"
            )
        tensors[name] = TensorInfo(name, gtype, shape, data_offset + offset, n_bytes)
    return version, fields, tensors, data_offset, alignment


def open_gguf(path: str | Path) -> GGUFFile:
    """Open and validate a GGUF file; raises GGUFError (or OSError for an unreadable path)."""
    return GGUFFile(path)
