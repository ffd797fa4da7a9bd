"""How minislm sets up Numba before any kernel is compiled: minislm/__init__.py imports this first.

1. Numba's on-disk cache must live somewhere writable even when the package is installed read-only:
   NUMBA_CACHE_DIR defaults to ~/.cache/minislm/numba.
2. 512-bit vectors. On AVX-512 CPUs LLVM's vectorisers prefer 256-bit vectors ("prefer-256-bit", a
   guard against the clock drop of early AVX-512 chips), which halves the GEMM's multiply-adds per
   instruction. Unless NUMBA_CPU_FEATURES is already set, the host's features are used with that
   preference switched off (numba PR #5757 does the same in Numba's own tests); NUMBA_CPU_NAME or
   NUMBA_CPU_FEATURES set by the user are left alone. It has to happen before
   Numba creates its code generator, i.e. before the first @njit function is defined in this process;
   if another library got there first, the kernels still run, with 256-bit vectors.
   MINISLM_PREFER_256=1 keeps LLVM's default.
3. The kernels choose their register tiles and int8 instructions from the features Numba compiles for
   (`vector_width_bits`, `has_feature`). AVX2_TARGET is the environment that makes a process compile for
   a Haswell (AVX2 + FMA, no AVX-512), so the AVX2 kernels can be checked on an AVX-512 machine too.
"""
import os

os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "minislm", "numba"))

import llvmlite.binding as llvm  # noqa: E402
import numba  # noqa: E402
from numba.core.registry import cpu_target  # noqa: E402


def _codegen_exists():
    # the target context (and with it the LLVM target machine) is created lazily, on first use
    return "_toplevel_target_context" in vars(cpu_target)


def host_has_avx512():
    return "+avx512f" in llvm.get_host_cpu_features().flatten().split(",")


def prefer_512_bit_vectors():
    """Let LLVM use 512-bit vectors on AVX-512 hosts; returns True when that is now in effect."""
    user_choice = any(os.environ.get(v) for v in ("NUMBA_CPU_FEATURES", "NUMBA_CPU_NAME"))
    if user_choice or os.environ.get("MINISLM_PREFER_256") == "1":
        return "-prefer-256-bit" in (numba.config.CPU_FEATURES or "")
    if not host_has_avx512() or _codegen_exists():
        return False
    numba.config.CPU_FEATURES = llvm.get_host_cpu_features().flatten() + ",-prefer-256-bit"
    return True


def vector_width_bits():
    """The vector width LLVM prefers for the kernels in this process: 512, or 256 (or less) otherwise."""
    flags = _compile_features()
    if "+avx512f" in flags and "-prefer-256-bit" in flags:
        return 512
    return 256 if "+avx2" in flags or "+avx" in flags else 128


def has_feature(name):
    """Whether the CPU Numba compiles for has feature `name` (LLVM's spelling, e.g. "avx512vnni")."""
    return f"+{name}" in _compile_features()


def _compile_features():
    # the features Numba compiles for: NUMBA_CPU_FEATURES (or what prefer_512_bit_vectors set), else the host's
    return (numba.config.CPU_FEATURES or llvm.get_host_cpu_features().flatten()).split(",")


# Haswell's features as LLVM names them: the oldest CPU with AVX2 and FMA, the AVX2 kernels' target.
AVX2_TARGET = {
    "NUMBA_CPU_NAME": "haswell",
    "NUMBA_CPU_FEATURES": "+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+crc32,+cx16,+cx8,+f16c,+fma,+fsgsbase,+fxsr,"
                          "+invpcid,+lzcnt,+mmx,+movbe,+pclmul,+popcnt,+rdrnd,+sahf,+sse,+sse2,+sse3,+sse4.1,"
                          "+sse4.2,+ssse3,+xsave,+xsaveopt",
}
