"""Run-time instruction-set dispatch (kernels/isa.py): the choice, its errors, and every path this CPU
allows against the others and against the float64 oracle, each in its own process (KAWAI_ISA is read once)."""

from __future__ import annotations

import json

import llvmlite.binding as llvm_binding
import numpy as np
import pytest

from kawai.kernels import isa
from python_runner import run_python, run_python_failing

SAPPHIRE_RAPIDS = {f: True for f in ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni",
                                     "avxvnni", "amx-tile")}
HASWELL = {f: True for f in ("avx", "avx2", "fma", "f16c")}
CASCADE_LAKE = {f: True for f in ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni")}
HOST = isa.HOST_FEATURES  # AMX only where the OS grants it
HOST_FLAT = llvm_binding.get_host_cpu_features().flatten()


def test_best_path_is_chosen_in_order():
    assert isa.choose(None, SAPPHIRE_RAPIDS) == "avx512vnni"
    assert isa.choose("", HASWELL) == "avx2"
    assert isa.choose(None, {"sse2": True}) == "portable"
    assert isa.supported(CASCADE_LAKE) == ["avx512vnni", "avx512bw", "avx2", "portable"]  # no AVX-VNNI
    assert isa.choose(None, SAPPHIRE_RAPIDS, jit=False) == "portable"  # NUMBA_DISABLE_JIT


def test_amx_needs_the_tile_and_int8_features():
    granite = dict(SAPPHIRE_RAPIDS, **{"amx-int8": True})
    assert isa.supported(granite)[:2] == ["amx", "avx512vnni"]
    assert isa.choose(None, SAPPHIRE_RAPIDS) == "avx512vnni"  # amx-tile alone is not enough
    # a forced vector path on an AMX machine compiles without the AMX features
    forced = isa.target_features("avx512vnni", {"avx512vnni": True, "amx-tile": True, "amx-int8": True})
    assert forced == "+avx512vnni,-amx-tile,-amx-int8"


def test_the_os_is_asked_for_the_tiles():
    """Where the CPU has AMX, the path is offered only if Linux grants this process the tile state."""
    raw = dict(llvm_binding.get_host_cpu_features())
    has_amx = all(raw.get(f, False) for f in isa.REQUIRED["amx"])
    assert ("amx" in isa.supported(HOST)) == (has_amx and isa.os_grants_amx())


def test_a_lower_path_can_be_forced_a_missing_one_cannot():
    assert isa.choose("avx2", SAPPHIRE_RAPIDS) == "avx2"
    assert isa.choose(" AVXVNNI ", SAPPHIRE_RAPIDS) == "avxvnni"
    assert isa.choose("portable", HASWELL) == "portable"
    with pytest.raises(isa.IsaError, match="allows only avx2, portable"):
        isa.choose("avx512vnni", HASWELL)
    with pytest.raises(isa.IsaError, match="allows only avx512vnni, avx512bw, avx2, portable"):
        isa.choose("avxvnni", CASCADE_LAKE)
    with pytest.raises(isa.IsaError, match="not one of"):
        isa.choose("sse9", SAPPHIRE_RAPIDS)
    with pytest.raises(isa.IsaError, match="allows only portable"):
        isa.choose("avx2", SAPPHIRE_RAPIDS, jit=False)


def test_a_forced_path_compiles_without_the_higher_extensions():
    features = dict(SAPPHIRE_RAPIDS, sse2=True)
    avx2 = isa.target_features("avx2", features).split(",")
    assert "+avx2" in avx2 and "+fma" in avx2 and "+sse2" in avx2
    assert {"-avx512f", "-avx512vnni", "-avxvnni", "-amx-tile"} <= set(avx2)
    avx512bw = isa.target_features("avx512bw", features).split(",")
    assert "+avx512bw" in avx512bw and "-avx512vnni" in avx512bw and "-avxvnni" in avx512bw
    portable = isa.target_features("portable", features).split(",")
    assert "+sse2" in portable and not [f for f in portable if f.startswith("+") and f[1:] != "sse2"]


def test_unknown_or_missing_path_fails_at_import():
    script = "import kawai.kernels.matmul"
    assert "is not one of" in run_python_failing(script, env={"KAWAI_ISA": "sse9"})
    assert "allows only portable" in run_python_failing(script, jit=False, env={"KAWAI_ISA": "avx2"})


def test_a_forced_path_needs_to_come_before_numba():
    """Every kawai module with kernels (here through the engine and the vision ops) fixes the path
    before its first @njit; Numba code compiled before kawai is an error, not a silently mixed target."""
    loaded = "import kawai.engine.vision.encoder_ops, kawai.engine.llm\nfrom kawai.kernels import isa\nprint(isa.ISA)"
    assert run_python(loaded, env={"KAWAI_ISA": "portable"}) == "portable"
    too_late = "import numba\nnumba.njit(lambda: 1)\nimport kawai.kernels.matmul"
    assert "before kawai.kernels.isa was imported" in run_python_failing(too_late, env={"KAWAI_ISA": "portable"})


def test_cpu_model_is_named():
    assert isa.cpu_model().strip()


# The instructions each path's block dots use (present, absent).
EXPECTED_ASM = {
    "amx": (("vpdpbusd", "zmm"), ("vpmaddubsw",)),  # the vector dots are avx512vnni's (prefill: test_matmul_amx)
    "avx512vnni": (("vpdpbusd", "zmm"), ("vpmaddubsw",)),
    "avx512bw": (("vpmaddubsw", "zmm"), ("vpdpbusd",)),
    "avxvnni": (("vpdpbusd", "{vex}", "vpsignb", "ymm"), ("zmm", "vpmaddubsw")),
    "avx2": (("vpmaddubsw", "vpmaddwd", "vpsignb", "ymm"), ("zmm", "vpdpbusd")),
    "portable": ((), ("ymm", "zmm", "vpdpbusd", "vpmaddubsw")),
}
DOTS_ASM = """
@numba.njit  # a fresh, uncached function: Numba can show its assembly
def dots(w, s, ss, x, xd, xqsum, n_blocks):
    return (simd.dot_s8_t1(w, 0, s, s, ss, ss, 0, x, xd, xqsum, 0, n_blocks, 0.0),
            simd.dot_u5_tile(w, 0, s, s, ss, ss, 0, x, xd, xqsum, 0, n_blocks, -16.0))

zeros8, zeros32 = np.zeros(4096, np.uint8), np.zeros(4096, np.float32)
dots(zeros8, zeros8.view(np.int8), zeros32, zeros8.view(np.int8), zeros32, zeros32, 8)
asm = dots.inspect_asm(dots.signatures[0])
found = {i: i in asm for i in sorted({i for both in EXPECTED_ASM.values() for part in both for i in part})}
"""


def _check_asm(path: str, found: dict[str, bool]):
    present, absent = EXPECTED_ASM[path]
    assert all(found[i] for i in present) and not any(found[i] for i in absent), (path, found)


def test_this_process_path_uses_its_instructions():
    import numba

    from kawai.kernels import matmul_simd as simd

    scope = {"numba": numba, "np": np, "simd": simd, "EXPECTED_ASM": EXPECTED_ASM}
    exec(DOTS_ASM, scope)
    _check_asm(isa.ISA, scope["found"])


# Each path: results on every packed format (odd block counts, token counts that are not a multiple of the
# tile), the error against float64 x @ dequant(W).T, prefill == token by token, the instructions used, and
# the features Numba compiled with (its on-disk cache key).
SCRIPT_PATH = """
import json, sys
import numba
import numpy as np
from gguf import GGMLQuantizationType, quants
from kawai.kernels import isa, matmul_simd as simd
from kawai.kernels.formats import FORMATS, PACKED_TYPES
from kawai.kernels.matmul import matmul, pack
from kawai.kernels.qtypes import GGMLType
from numba.core.registry import cpu_target

rng = np.random.default_rng(0)
cases, outputs = [], []
# every packed type of the table; odd block counts (9, 3), a single block, more than one pair of super-blocks
COLS = {GGMLType.Q8_0: 288, GGMLType.Q4_1: 96, GGMLType.Q4_0: 32, GGMLType.Q4_K: 512, GGMLType.Q5_K: 768}
for qtype in sorted(PACKED_TYPES):
    cols = COLS.get(qtype, 256)
    rows = 37
    if qtype.block_size == 256:  # random bits, sane f16 scales
        raw = rng.integers(0, 256, (rows * cols // 256, qtype.type_size), dtype=np.uint8)
        for at in FORMATS[qtype].f16_fields:
            raw[:, at:at + 2] = np.full(len(raw), 0.01, "<f2").view(np.uint8).reshape(-1, 2)
        raw = raw.reshape(rows, -1)
    else:
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        raw = quants.quantize(w, GGMLQuantizationType(int(qtype))).view(np.uint8).reshape(rows, -1)
    packed = pack(raw, qtype, cols)
    x = rng.standard_normal((21, cols)).astype(np.float32)
    y = matmul(packed, x)
    alone = np.concatenate([matmul(packed, x[i:i + 1]) for i in range(len(x))])
    ref_w = quants.dequantize(raw, GGMLQuantizationType(int(qtype))).reshape(rows, cols).astype(np.float64)
    ref = x.astype(np.float64) @ ref_w.T
    terms = np.abs(x.astype(np.float64)) @ np.abs(ref_w).T  # sum of |terms| per output
    cases.append({"qtype": qtype.name, "err": float(np.linalg.norm(y - ref) / np.linalg.norm(ref)),
                  "prefill_equals_alone": bool(np.array_equal(y, alone))})
    outputs.append((y, terms))
EXPECTED_ASM = json.loads(sys.argv[2])
""" + DOTS_ASM + """
np.save(sys.argv[1], np.stack([np.concatenate([y.ravel() for y, _ in outputs]),
                              np.concatenate([t.ravel() for _, t in outputs])]))
print(json.dumps({"isa": isa.ISA, "cases": cases, "features": cpu_target.target_context.codegen()._tm_features,
                  "asm": found}))
"""


def _run_path(path: str, out_file: str) -> dict:
    out = run_python(SCRIPT_PATH, out_file, json.dumps(EXPECTED_ASM), env={"KAWAI_ISA": path})
    return json.loads(out.splitlines()[-1])


@pytest.mark.slow
def test_every_path_the_cpu_allows(tmp_path):
    """All SIMD paths give the same floats bit for bit; portable adds in another order (bounded)."""
    paths = isa.supported(HOST)
    runs = {p: _run_path(p, str(tmp_path / f"{p}.npy")) for p in paths}
    results = {p: np.load(tmp_path / f"{p}.npy") for p in paths}
    for p, run in runs.items():
        assert run["isa"] == p
        for case in run["cases"]:
            assert case["err"] < 1e-2, (p, case)
            assert case["prefill_equals_alone"], (p, case)
        _check_asm(p, run["asm"])
        # a forced path compiles (and caches: the features key Numba's cache) as for a CPU without the higher
        # extensions; the best one as for this CPU
        assert run["features"] == (HOST_FLAT if p == paths[0] else isa.target_features(p, HOST))
    simd_paths = [p for p in paths if p != "portable"]
    for p in simd_paths[1:]:
        assert np.array_equal(results[p][0], results[simd_paths[0]][0]), p
    if simd_paths:
        y_simd, y_portable, terms = results[simd_paths[0]][0], results["portable"][0], results["portable"][1]
        # float32 sums of at most 24 block terms, in different orders: a few ulps of the sum of |terms|
        assert np.all(np.abs(y_simd - y_portable) <= 1e-5 * terms)
