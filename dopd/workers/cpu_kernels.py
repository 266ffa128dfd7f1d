"""Our CPU kernels (`csrc/*.cpp`): compiled once per machine with g++ into the model cache, loaded
with ctypes.

They are plain C++ with AVX-512 intrinsics and no torch headers, so a build takes about a second;
threads come from OpenMP, which resolves to the libgomp torch has already loaded, so the kernels
share torch's thread team and `torch.set_num_threads`. Where they cannot run (no AVX-512, no
compiler, or `DOPD_CPU_KERNELS=0`) `library()` is None and torch's own ops serve every step.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = tuple(sorted(CSRC.glob("*.cpp")))
HEADERS = tuple(sorted(CSRC.glob("*.h")))
COMPILE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")

_ptr, _i32, _f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
SIGNATURES = {  # name -> (argument types, result type)
    "dopd_q4_1_matmul": ([_ptr, _i32, _i32, _i32, _ptr, _ptr, _ptr, _ptr], None),
    "dopd_q8_0_matmul": ([_ptr, _i32, _i32, _i32, _ptr, _ptr, _ptr], None),
    "dopd_add_rms_norm": ([_ptr, _ptr, _ptr, _i32, _i32, _f32, _ptr, _ptr], None),
    "dopd_rotary": ([_ptr, _i32, _i32, _i32, _i32, _ptr, _ptr], None),
    "dopd_silu_mul": ([_ptr, _i32, _i32, _ptr], None),
    "dopd_paged_decode_attention_supports": ([_i32, _i32], _i32),
    "dopd_paged_decode_attention": ([_ptr, _ptr, _i32, _i32, _i32, _i32, _i32, _i32, _ptr, _i32, _ptr, _i32, _f32, _ptr],
                                    _i32),
    # The structs are fused_decode.py's LayerWeights and Step, passed by address.
    "dopd_decode_scratch_floats": ([_ptr, _i32], ctypes.c_int64),
    "dopd_decode_layer": ([_ptr, _ptr, _i32, _ptr], _i32),
}


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels; None where they cannot run."""
    if os.environ.get("DOPD_CPU_KERNELS", "1") == "0":
        return None
    if platform.machine() not in ("x86_64", "AMD64") or "avx512f" not in _cpu_flags():
        log.info("CPU kernels off: they need an x86 CPU with AVX-512; torch's ops serve every step")
        return None
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        log.warning("CPU kernels off: no C++ compiler (g++) found; torch's ops serve every step")
        return None
    # -march=native code is only safe on the CPU it was built for. A VM's model name can be as vague as
    # "AMD EPYC" for two generations with different instruction sets, so the flags name the build too.
    digest = hashlib.sha256(" ".join(COMPILE_FLAGS).encode() + cpu_model().encode()
                            + " ".join(sorted(_cpu_flags())).encode())
    for source in SOURCES + HEADERS:
        digest.update(source.read_bytes())
    from dopd.embedded import cache_dir

    out = cache_dir() / "kernels" / f"dopd_cpu-{digest.hexdigest()[:16]}.so"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        result = subprocess.run([compiler, *COMPILE_FLAGS, "-o", str(tmp), *map(str, SOURCES)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            log.warning("CPU kernels off: compiling them failed:\n%s", result.stderr[-2000:])
            return None
        os.replace(tmp, out)  # atomic: workers building at once each rename a whole file
    lib = ctypes.CDLL(str(out))
    for name, (args, result) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    return lib


def _cpu_info() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _cpu_flags() -> set[str]:
    line = next((ln for ln in _cpu_info().splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def cpu_model() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it."""
    line = next((ln for ln in _cpu_info().splitlines() if ln.startswith("model name")), "")
    return line.partition(":")[2].strip() or platform.processor()


class LayerOps:
    """A decoder layer's small ops as single kernel calls (csrc/layer_ops.cpp); float32, contiguous rows."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib

    def add_rms_norm(self, x, add, weight, eps: float):
        """(x + add, weight * rmsnorm(x + add)); with add None, (x, weight * rmsnorm(x))."""
        rows, dim = x.shape
        residual = x if add is None else torch.empty_like(x)
        out = torch.empty_like(x)
        self.lib.dopd_add_rms_norm(x.data_ptr(), None if add is None else add.data_ptr(), weight.data_ptr(), rows, dim,
                                   eps, residual.data_ptr(), out.data_ptr())
        return residual, out

    def rotary_(self, x, heads: int, head_dim: int, cos, sin) -> None:
        """Rotate the first `heads` heads of every row of x [rows, row width] in place."""
        self.lib.dopd_rotary(x.data_ptr(), x.shape[0], x.stride(0), heads, head_dim, cos.data_ptr(), sin.data_ptr())

    def silu_mul(self, gate_up):
        rows, width = gate_up.shape
        out = torch.empty(rows, width // 2, dtype=gate_up.dtype)
        self.lib.dopd_silu_mul(gate_up.data_ptr(), rows, width // 2, out.data_ptr())
        return out
