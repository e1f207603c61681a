"""Weights: the model's tensors, named after their GGUF tensors and packed for kernels/matmul.py.

Loading is mechanical: every name below is `blk.{i}.<field>.weight` (or `.bias`) in the file -- llama.cpp's
names, the same for every architecture (engine/architectures.py) -- each is checked against the shape
the config implies, and a missing tensor is a KawaiError naming it.

Matrices are `PackedMatrix` (rows = outputs, cols = inputs; y = x @ W.T). The projections that read
the same input are stacked at load (`attn_qkv`, `ffn_gate_up`: one kernel launch where their formats
agree; `attn_q`, `ffn_gate`, ... remain as views). In the default mode the
quantized bytes are repacked for the integer kernels; with `exact=True` every matrix is dequantized to
float32 (kernels/dequant.py) and multiplied in float32, for tests against float references.
Norm weights and biases are float32 vectors. `token_embd` stays as raw bytes in the memory map: a
forward pass dequantizes only the rows of its tokens. A matrix's pages of the memory map are released
once it is packed, so the resident memory holds each weight once (the packed copy), not twice. The
release is repeated once every tensor has been read: where the kernel's page cache uses large folios, a
fault maps the whole folio, so reading one tensor maps back the released tail of its neighbour.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from kawai.engine.architectures import OUTPUT_TENSOR, ROPE_FREQS_TENSOR
from kawai.engine.config import ModelConfig
from kawai.engine.errors import KawaiError
from kawai.engine.gguf import GGUFFile
from kawai.kernels.dequant import dequantize, dequantize_row_ids
from kawai.kernels.matmul import MATMUL_TYPES, PackedMatrix, StackedMatrix, pack, pack_dense, stack
from kawai.kernels.qtypes import GGMLType

FLOAT_VECTOR_TYPES = (GGMLType.F32, GGMLType.F16)
LOAD_THREADS = min(4, os.cpu_count() or 1)  # threads that pack layers at load time


@dataclass(frozen=True, eq=False)
class Embedding:
    """token_embd: raw GGUF rows (n_vocab, row_bytes) uint8, dequantized per lookup."""

    raw: np.ndarray  # (n_vocab, row_bytes) uint8, a view of the memory map
    qtype: GGMLType
    n_vocab: int
    d_model: int

    def lookup(self, tokens: np.ndarray) -> np.ndarray:
        """(n,) token ids in 0..n_vocab-1 -> (n, d_model) float32."""
        return dequantize_row_ids(self.raw, self.qtype, tokens)


@dataclass(frozen=True, eq=False)
class LayerWeights:
    attn_norm: np.ndarray  # (d_model,)
    attn_qkv: StackedMatrix  # attn_q (q_dim, d_model) | attn_k (kv_dim, d_model) | attn_v (kv_dim, d_model)
    attn_q_bias: np.ndarray | None  # (q_dim,)   qkv_bias only
    attn_k_bias: np.ndarray | None  # (kv_dim,)
    attn_v_bias: np.ndarray | None  # (kv_dim,)
    attn_q_norm: np.ndarray | None  # (head_dim,) qk_norm only
    attn_k_norm: np.ndarray | None  # (head_dim,)
    attn_output: PackedMatrix  # (d_model, q_dim)
    ffn_norm: np.ndarray  # (d_model,)
    ffn_gate_up: StackedMatrix  # ffn_gate (d_ff, d_model) | ffn_up (d_ff, d_model)
    ffn_down: PackedMatrix  # (d_model, d_ff)

    @property
    def attn_q(self) -> PackedMatrix:
        return self.attn_qkv.parts[0]

    @property
    def attn_k(self) -> PackedMatrix:
        return self.attn_qkv.parts[1]

    @property
    def attn_v(self) -> PackedMatrix:
        return self.attn_qkv.parts[2]

    @property
    def ffn_gate(self) -> PackedMatrix:
        return self.ffn_gate_up.parts[0]

    @property
    def ffn_up(self) -> PackedMatrix:
        return self.ffn_gate_up.parts[1]


@dataclass(frozen=True, eq=False)
class Weights:
    token_embd: Embedding  # (n_vocab, d_model)
    layers: tuple[LayerWeights, ...]
    output_norm: np.ndarray  # (d_model,)
    output: PackedMatrix  # (n_vocab, d_model); token_embd itself when the output is tied
    rope_freqs: np.ndarray | None  # (head_dim/2,) Llama 3 frequency divisors, when the file has them
    exact: bool

    @property
    def nbytes(self) -> int:
        """Resident bytes of packed matrices and vectors (the memory-mapped embedding not counted)."""
        total = self.output.nbytes + self.output_norm.nbytes
        for layer in self.layers:
            for value in vars(layer).values():
                if value is not None:
                    total += value.nbytes
        return int(total)


def load_weights(gguf: GGUFFile, cfg: ModelConfig, *, exact: bool = False) -> Weights:
    """Read, check and pack every tensor the config needs. Layers are packed on LOAD_THREADS threads
    (the repacking is NumPy work on large arrays, which releases the GIL); the first error is raised."""
    loader = TensorLoader(gguf, exact)
    d, hd = cfg.d_model, cfg.head_dim
    # The tied-output rule, in one place: without output.weight the logits reuse token_embd.
    output_name = "token_embd.weight" if cfg.tied_output else OUTPUT_TENSOR
    with ThreadPoolExecutor(LOAD_THREADS) as pool:
        packing_output = pool.submit(loader.matrix, output_name, cfg.n_vocab, d)  # the largest matrix first
        layers = list(pool.map(lambda i: _load_layer(loader, cfg, i), range(cfg.n_layers)))
        output = packing_output.result()
    loader.release_packed()  # again, now that nothing reads the file: neighbours' reads mapped some back
    rope_freqs = None
    if ROPE_FREQS_TENSOR in gguf.tensors:
        rope_freqs = loader.vector(ROPE_FREQS_TENSOR, hd // 2)
        if not np.all(np.isfinite(rope_freqs) & (rope_freqs > 0)):
            raise KawaiError(f"tensor {ROPE_FREQS_TENSOR!r} must hold positive finite frequency divisors")
    return Weights(
        token_embd=loader.embedding("token_embd.weight", cfg.n_vocab, d),
        layers=tuple(layers),
        output_norm=loader.vector("output_norm.weight", d),
        output=output,
        rope_freqs=rope_freqs,
        exact=exact,
    )


def _load_layer(loader: TensorLoader, cfg: ModelConfig, i: int) -> LayerWeights:
    d, hd, q_dim, kv_dim, ff = cfg.d_model, cfg.head_dim, cfg.q_dim, cfg.kv_dim, cfg.d_ff
    blk = f"blk.{i}"
    return LayerWeights(
        attn_norm=loader.vector(f"{blk}.attn_norm.weight", d),
        attn_qkv=stack([loader.matrix(f"{blk}.attn_q.weight", q_dim, d),
                        loader.matrix(f"{blk}.attn_k.weight", kv_dim, d),
                        loader.matrix(f"{blk}.attn_v.weight", kv_dim, d)]),
        attn_q_bias=loader.vector(f"{blk}.attn_q.bias", q_dim) if cfg.qkv_bias else None,
        attn_k_bias=loader.vector(f"{blk}.attn_k.bias", kv_dim) if cfg.qkv_bias else None,
        attn_v_bias=loader.vector(f"{blk}.attn_v.bias", kv_dim) if cfg.qkv_bias else None,
        attn_q_norm=loader.vector(f"{blk}.attn_q_norm.weight", hd) if cfg.qk_norm else None,
        attn_k_norm=loader.vector(f"{blk}.attn_k_norm.weight", hd) if cfg.qk_norm else None,
        attn_output=loader.matrix(f"{blk}.attn_output.weight", d, q_dim),
        ffn_norm=loader.vector(f"{blk}.ffn_norm.weight", d),
        ffn_gate_up=stack([loader.matrix(f"{blk}.ffn_gate.weight", ff, d),
                           loader.matrix(f"{blk}.ffn_up.weight", ff, d)]),
        ffn_down=loader.matrix(f"{blk}.ffn_down.weight", d, ff),
    )


class TensorLoader:
    """Looks tensors up by name, checks type and shape, and converts them. Problems raise `error` and
    name the tensor; `file_kind` says which file a missing tensor was expected in."""

    def __init__(
        self, gguf: GGUFFile, exact: bool, *, error: type[KawaiError] = KawaiError, file_kind: str = "model file"
    ):
        self.gguf = gguf
        self.exact = exact
        self.error = error
        self.file_kind = file_kind
        self.packed: list[str] = []  # tensors copied into another layout: their file pages are not needed

    def release_packed(self) -> None:
        for name in self.packed:
            self.gguf.release(name)

    def _info(self, name: str, shape: tuple[int, ...]):
        info = self.gguf.tensors.get(name)
        if info is None:
            raise self.error(f"tensor {name!r} is missing from the {self.file_kind}")
        if info.shape != shape:
            raise self.error(f"tensor {name!r} has shape {info.shape}, expected {shape}")
        return info

    def floats(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """An F32 or F16 tensor of `shape` as a float32 copy."""
        info = self._info(name, shape)
        if info.ggml_type not in FLOAT_VECTOR_TYPES:
            raise self.error(f"tensor {name!r} has type {info.ggml_type.name}, expected F32 or F16")
        return np.array(self.gguf.tensor_array(name), dtype=np.float32)

    def vector(self, name: str, n: int) -> np.ndarray:
        """A 1-D float tensor as a float32 copy."""
        return self.floats(name, (n,))

    def matrix(self, name: str, rows: int, cols: int) -> PackedMatrix:
        info = self._matmul_info(name, rows, cols)
        raw = self.gguf.tensor_data(name)  # (rows, row_bytes) uint8
        if self.exact:
            packed = pack_dense(dequantize(raw, info.ggml_type, info.shape), info.ggml_type)
        else:
            packed = pack(raw, info.ggml_type, cols)
        self.gguf.release(name)  # the copy is what the kernels read: the file's pages leave the RSS
        self.packed.append(name)
        return packed

    def embedding(self, name: str, rows: int, cols: int) -> Embedding:
        info = self._matmul_info(name, rows, cols)
        return Embedding(self.gguf.tensor_data(name), info.ggml_type, rows, cols)

    def _matmul_info(self, name: str, rows: int, cols: int):
        info = self._info(name, (rows, cols))
        if info.ggml_type not in MATMUL_TYPES:
            raise self.error(f"tensor {name!r} has type {info.ggml_type.name}, which is not supported")
        return info
