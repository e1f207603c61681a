"""The SIMD instruction set the matmul kernels use, chosen once when the process starts.

    ISA            integer block dot (kernels/matmul_simd.py)             vector   CPUs (examples)
    amx            avx512vnni, and prefill on AMX tiles (kernels/matmul_amx.py)  512-bit  Sapphire Rapids, Granite Rapids
    avx512vnni     vpdpbusd: u8 x s8, 4 products summed into each i32      512-bit  Ice Lake, Sapphire Rapids, Zen 4
    avx512bw       vpmaddubsw -> i16 pairs, vpmaddwd -> i32                512-bit  Skylake-X
    avxvnni        vpdpbusd, VEX-encoded                                  256-bit  Alder Lake, Arrow Lake
    avx2           vpmaddubsw, vpmaddwd                                   256-bit  Haswell and later, Zen 1-3
    portable       plain loops (`dot_portable`), no intrinsics            -        anything; NUMBA_DISABLE_JIT=1

"amx" needs, beyond the CPU's AMX-TILE and AMX-INT8, the OS's permission to use the tile registers (Linux
grants it on request, arch_prctl(ARCH_REQ_XCOMP_PERM); a sandbox or an old kernel may not): asked for once
here, and without it the CPU is treated as lacking AMX.

`ISA` is the best path the CPU supports (`BEST`, in the order of `ISAS`, highest first), or the one the
environment variable KAWAI_ISA names. KAWAI_ISA may name a path the CPU supports, never one it lacks
(that is an `IsaError`, not a silent downgrade). So every path can be tested on the strongest machine.

A forced path also compiles *everything* as for a CPU that has only that path's features: Numba's target
features (numba.config.CPU_FEATURES) are set from the host's with the higher extensions switched off, so
LLVM cannot slip AVX-512 instructions into the `avx2` path's code. The features are part of the key of
Numba's on-disk cache (codegen.magic_tuple()), so kernels cached for one path are never loaded for another.
Numba fixes its target features when it creates its compiler, at the first `@njit` of the process: this
module must run before that: every module that uses `@njit` imports it before its first kernel (pure
Python modules such as qtypes.py do not, so light commands never load Numba). It checks that it ran in
time and raises IsaError otherwise.

All four SIMD paths give bit-identical results (kernels/matmul_simd.py: the integer sums are exact, and the
float accumulation order is the same 16 lanes on every width); the portable path adds the same terms in
another order (tests bound the difference).
"""

from __future__ import annotations

import os

import llvmlite.binding as llvm_binding
import numba

ISAS = ("amx", "avx512vnni", "avx512bw", "avxvnni", "avx2", "portable")  # best first
ENV_VAR = "KAWAI_ISA"

# The LLVM features each path needs.
REQUIRED = {  # f16c: the kernels widen float16 scales with vcvtph2ps (every AVX2 CPU has it)
    "amx": ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "amx-tile", "amx-int8"),
    "avx512vnni": ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni"),
    "avx512bw": ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl"),
    "avxvnni": ("avx2", "fma", "f16c", "avxvnni"),
    "avx2": ("avx2", "fma", "f16c"),
    "portable": (),
}
# The LLVM features a forced path switches off (with every feature that depends on them): what a CPU of
# that generation lacks. Names are prefixes ("avx512" covers avx512f, avx512bw, ...).
SWITCHED_OFF = {
    "amx": (),
    "avx512vnni": ("amx",),
    "avx512bw": ("amx", "avx10", "avxvnni", "avx512vnni", "avx512bf16", "avx512fp16", "avx512vbmi", "avx512ifma",
                 "avx512bitalg", "avx512vpopcntdq", "avx512vp2intersect"),
    "avxvnni": ("amx", "avx10", "avx512", "evex512"),
    "avx2": ("amx", "avx10", "avx512", "evex512", "avxvnni", "avxifma", "avxneconvert"),
    "portable": ("amx", "avx", "evex512", "fma", "f16c", "vaes", "vpclmulqdq"),
}


class IsaError(RuntimeError):
    """KAWAI_ISA names an unknown path or one this CPU lacks, or Numba compiled before the choice."""


def supported(features: dict[str, bool]) -> list[str]:
    """The paths a CPU with these LLVM features can run, best first (always ends with "portable")."""
    return [isa for isa in ISAS if all(features.get(f, False) for f in REQUIRED[isa])]


def choose(requested: str | None, features: dict[str, bool], jit: bool = True) -> str:
    """The path to use: `requested` (KAWAI_ISA) if given and supported, else the best supported one."""
    allowed = supported(features) if jit else ["portable"]
    if not requested:
        return allowed[0]
    requested = requested.strip().lower()
    if requested not in ISAS:
        raise IsaError(f"{ENV_VAR}={requested!r} is not one of {', '.join(ISAS)}")
    if requested not in allowed:
        raise IsaError(f"{ENV_VAR}={requested}: this CPU (or NUMBA_DISABLE_JIT) allows only {', '.join(allowed)}")
    return requested


def target_features(isa: str, features: dict[str, bool]) -> str:
    """The host's LLVM feature string with what `isa`'s CPUs lack switched off (+a,-b,... for Numba)."""
    off = SWITCHED_OFF[isa]
    return ",".join(("-" if (not on or name.startswith(off)) else "+") + name for name, on in features.items())


def _numba_features() -> str:
    """The target features of Numba's compiler (creating it if no kernel was compiled yet)."""
    from numba.core.registry import cpu_target

    return cpu_target.target_context.codegen()._tm_features


def os_grants_amx() -> bool:
    """Ask Linux for the tile data state (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)): True if
    this process may now use the AMX tiles. Without the grant a tile instruction raises SIGILL."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(158, 0x1023, 18) == 0  # SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    except (OSError, AttributeError):
        return False


def _host_features() -> dict[str, bool]:
    """The host's LLVM features, with AMX switched off unless the OS grants the tiles."""
    host = dict(llvm_binding.get_host_cpu_features())
    if all(host.get(f, False) for f in REQUIRED["amx"]) and not os_grants_amx():
        host["amx-tile"] = host["amx-int8"] = False
    return host


def _select(host: dict[str, bool]) -> str:
    jit = not numba.config.DISABLE_JIT
    isa = choose(os.environ.get(ENV_VAR), host, jit)
    if jit and isa != supported(host)[0]:  # a forced lower path: compile as for that CPU
        wanted = target_features(isa, host)
        numba.config.CPU_FEATURES = wanted
        if _numba_features() != wanted:
            raise IsaError(f"{ENV_VAR}={isa}: Numba compiled code before kawai.kernels.isa was imported; "
                           "import kawai.kernels before any other Numba code")
    return isa


HOST_FEATURES = _host_features()  # the host's LLVM features, AMX only where the OS grants it
BEST = supported(HOST_FEATURES)[0]  # what this CPU allows
ISA = _select(HOST_FEATURES)  # what this process uses
VECTOR_ISA = "avx512vnni" if ISA == "amx" else ISA  # the vector kernels' path (AMX adds tiles to AVX-512 VNNI)


def cpu_model() -> str:
    """The CPU's name from /proc/cpuinfo ("model name"; a VM may report a generic one), else LLVM's name
    for the host (which guesses from the model number, so a VM can mislead it too)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return llvm_binding.get_host_cpu_name()
