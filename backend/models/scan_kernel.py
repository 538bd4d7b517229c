"""The compiled CPU selective-scan kernel: a small C file, built at first use with the machine's C compiler and
cached, called through ctypes (no torch headers, no Python headers: it builds in about a second).

Layout: u, delta, y (b, d, L); A (d, n); B, C (b, g, L, n) with row d in group d // (d / g). The forward keeps
the state x (n floats) in registers and checkpoints it every `CHUNK` steps; the backward walks the chunks from
the last, recomputes each chunk's states from its checkpoint and runs the reverse (adjoint) scan over it. The
exp is a Cephes-style polynomial written so the compiler vectorises the d_state loop (no -ffast-math, which
would change the floating-point mode of the whole process). ctypes releases the GIL, so a thread pool runs the
rows in parallel with torch's thread count.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import logging
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CHUNK = 32  # steps between checkpointed states; the backward recomputes one chunk at a time

SOURCE = r"""
#include <stdint.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))

/* exp(x), ~2 ulp on [-87, 88] (Cephes expf polynomial). Branch-free and integer-conversion-free (round via
   the 1.5 * 2^23 trick), so the compiler vectorises loops that call it. */
INLINE float vexp(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    union { float f; int32_t i; } m = { x * 1.44269504088896341f + 12582912.0f };
    float n = m.f - 12582912.0f;
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } s = { (m.i - 0x4B400000 + 127) * (1 << 23) };
    return p * s.f;
}

/* A block is W consecutive rows d0..d0+W-1 of one batch element b, all in one group of B/C; the W rows are
   the SIMD lanes (B_t, C_t are shared by the block). x[k * W + w] is the state of lane w. */
#define BLOCK_SETUP                                                                         \
    const int64_t blocks_per_batch = dim / W, b = blk / blocks_per_batch;                   \
    const int64_t d0 = (blk % blocks_per_batch) * W, g = d0 / (dim / groups);               \
    const int64_t row0 = b * dim + d0, nck = (L + K - 1) / K;                               \
    const float *Bg = B + (b * groups + g) * L * n, *Cg = C + (b * groups + g) * L * n;     \
    float *ck = (float *)ckpt + (b * dim + d0) * nck * n;  /* (W rows) x nck x n */        \
    float Ab[n * W];                                                                        \
    for (int64_t k = 0; k < n; k++)                                                         \
        for (int w = 0; w < W; w++) Ab[k * W + w] = A[(d0 + w) * n + k];

INLINE void load_lanes(const float *src, int64_t row0, int64_t L, int64_t t, float *dst, const int W) {
    for (int w = 0; w < W; w++) dst[w] = src[(row0 + w) * L + t];
}

INLINE void save_checkpoint(float *ck, const float *x, int64_t c, int64_t nck, int64_t n, const int W) {
    for (int w = 0; w < W; w++)
        for (int64_t k = 0; k < n; k++) ck[(w * nck + c) * n + k] = x[k * W + w];
}

INLINE void fwd_block(const float *u, const float *delta, const float *A, const float *B, const float *C,
                      float *y, float *last, float *ckpt, int64_t dim, int64_t groups, int64_t L, int64_t n,
                      int64_t K, int64_t blk, const int W) {
    BLOCK_SETUP
    float x[n * W], dt[W], dtu[W], acc[W];
    memset(x, 0, sizeof x);
    for (int64_t t = 0; t < L; t++) {
        if (t % K == 0) save_checkpoint(ck, x, t / K, nck, n, W);
        load_lanes(delta, row0, L, t, dt, W);
        load_lanes(u, row0, L, t, dtu, W);
        for (int w = 0; w < W; w++) { dtu[w] *= dt[w]; acc[w] = 0.0f; }
        const float *Bt = Bg + t * n, *Ct = Cg + t * n;
        for (int64_t k = 0; k < n; k++) {
            const float bk = Bt[k], ck_ = Ct[k];
            float *xk = x + k * W;
            const float *Ak = Ab + k * W;
            #pragma omp simd
            for (int w = 0; w < W; w++) {
                float v = vexp(dt[w] * Ak[w]) * xk[w] + dtu[w] * bk;
                xk[w] = v;
                acc[w] += ck_ * v;
            }
        }
        for (int w = 0; w < W; w++) y[(row0 + w) * L + t] = acc[w];
    }
    for (int w = 0; w < W; w++)
        for (int64_t k = 0; k < n; k++) last[(row0 + w) * n + k] = x[k * W + w];
}

/* Backward of one block: du, ddelta of its rows; adds into dA (d, n), dB, dC (g, L, n) of this task.
   work: 2 * K * n * W floats (the recomputed states and decays of one chunk). */
INLINE void bwd_block(const float *u, const float *delta, const float *A, const float *B, const float *C,
                      const float *ckpt, const float *dy, float *du, float *ddelta, float *dA, float *dB,
                      float *dC, float *work, int64_t dim, int64_t groups, int64_t L, int64_t n, int64_t K,
                      int64_t blk, const int W) {
    BLOCK_SETUP
    float gx[n * W], dAb[n * W], x0[n * W], dt[W], ut[W], dtu[W], dyt[W], gB[W], gA[W];
    float *X = work, *decay = work + K * n * W;
    float *dBg = dB + g * L * n, *dCg = dC + g * L * n;
    memset(gx, 0, sizeof gx);
    memset(dAb, 0, sizeof dAb);
    for (int64_t c = nck - 1; c >= 0; c--) {
        const int64_t t0 = c * K, m = (L - t0 < K) ? L - t0 : K;
        for (int w = 0; w < W; w++)
            for (int64_t k = 0; k < n; k++) x0[k * W + w] = ck[(w * nck + c) * n + k];
        const float *prev = x0;
        for (int64_t j = 0; j < m; j++) {  /* recompute the chunk's states and decays */
            const int64_t t = t0 + j;
            load_lanes(delta, row0, L, t, dt, W);
            load_lanes(u, row0, L, t, dtu, W);
            for (int w = 0; w < W; w++) dtu[w] *= dt[w];
            const float *Bt = Bg + t * n;
            float *Xj = X + j * n * W, *aj = decay + j * n * W;
            for (int64_t k = 0; k < n; k++) {
                const float bk = Bt[k], *Ak = Ab + k * W, *pk = prev + k * W;
                float *ak = aj + k * W, *Xk = Xj + k * W;
                #pragma omp simd
                for (int w = 0; w < W; w++) {
                    float a = vexp(dt[w] * Ak[w]);
                    ak[w] = a;
                    Xk[w] = a * pk[w] + dtu[w] * bk;
                }
            }
            prev = Xj;
        }
        for (int64_t j = m - 1; j >= 0; j--) {  /* reverse scan: gx = dLoss/dx_t, carried as a_t * G_t */
            const int64_t t = t0 + j;
            load_lanes(delta, row0, L, t, dt, W);
            load_lanes(u, row0, L, t, ut, W);
            load_lanes(dy, row0, L, t, dyt, W);
            for (int w = 0; w < W; w++) { dtu[w] = dt[w] * ut[w]; gB[w] = 0.0f; gA[w] = 0.0f; }
            const float *Bt = Bg + t * n, *Ct = Cg + t * n, *Xj = X + j * n * W, *aj = decay + j * n * W;
            const float *Xp = j > 0 ? X + (j - 1) * n * W : x0;
            float *dBt = dBg + t * n, *dCt = dCg + t * n;
            for (int64_t k = 0; k < n; k++) {
                const float bk = Bt[k], ck_ = Ct[k];
                const float *Xpk = Xp + k * W, *Xk = Xj + k * W, *ak = aj + k * W, *Ak = Ab + k * W;
                float *gk = gx + k * W, *dAk = dAb + k * W;
                float sB = 0.0f, sC = 0.0f;
                #pragma omp simd reduction(+:sB, sC)
                for (int w = 0; w < W; w++) {
                    float G = dyt[w] * ck_ + gk[w];
                    float ta = G * Xpk[w] * ak[w];
                    sC += dyt[w] * Xk[w];
                    sB += G * dtu[w];
                    gB[w] += G * bk;
                    gA[w] += ta * Ak[w];
                    dAk[w] += ta * dt[w];
                    gk[w] = G * ak[w];
                }
                dBt[k] += sB;
                dCt[k] += sC;
            }
            for (int w = 0; w < W; w++) {
                du[(row0 + w) * L + t] = dt[w] * gB[w];
                ddelta[(row0 + w) * L + t] = ut[w] * gB[w] + gA[w];
            }
        }
    }
    for (int w = 0; w < W; w++)
        for (int64_t k = 0; k < n; k++) dA[(d0 + w) * n + k] += dAb[k * W + w];
}

#define DISPATCH(CALL)                                                \
    switch (W) {                                                      \
    case 16: for (int64_t blk = b0; blk < b1; blk++) CALL(16); break; \
    case 8: for (int64_t blk = b0; blk < b1; blk++) CALL(8); break;   \
    case 4: for (int64_t blk = b0; blk < b1; blk++) CALL(4); break;   \
    case 2: for (int64_t blk = b0; blk < b1; blk++) CALL(2); break;   \
    default: for (int64_t blk = b0; blk < b1; blk++) CALL(1); break;  \
    }

/* Forward over blocks b0 <= blk < b1 (W rows each): y, the last state, and the state before every chunk. */
void scan_fwd(const float *u, const float *delta, const float *A, const float *B, const float *C,
              float *y, float *last, float *ckpt, int64_t dim, int64_t groups, int64_t L, int64_t n,
              int64_t K, int64_t W, int64_t b0, int64_t b1) {
#define FWD(w) fwd_block(u, delta, A, B, C, y, last, ckpt, dim, groups, L, n, K, blk, w)
    DISPATCH(FWD)
}

/* Backward over blocks b0 <= blk < b1, all of one batch element (dA, dB, dC are this task's slots). */
void scan_bwd(const float *u, const float *delta, const float *A, const float *B, const float *C,
              const float *ckpt, const float *dy, float *du, float *ddelta, float *dA, float *dB, float *dC,
              float *work, int64_t dim, int64_t groups, int64_t L, int64_t n, int64_t K, int64_t W,
              int64_t b0, int64_t b1) {
#define BWD(w) bwd_block(u, delta, A, B, C, ckpt, dy, du, ddelta, dA, dB, dC, work, dim, groups, L, n, K, blk, w)
    DISPATCH(BWD)
}
"""


def _compiler() -> str | None:
    """$CC when set (the user's explicit choice), else Python's configured compiler, cc, gcc or clang."""
    names = [os.environ["CC"]] if os.environ.get("CC") else [sysconfig.get_config_var("CC"), "cc", "gcc", "clang"]
    for name in names:
        path = name and shutil.which(name.split()[0])
        if path:
            return path
    return None


def _cache_dir() -> Path:
    root = os.environ.get("MOTION_MAMBA_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "motion_mamba"


FLAGS = ["-O3", "-std=c99", "-fPIC", "-shared", "-fopenmp-simd", "-fno-math-errno"]
NATIVE = "-march=native"  # AVX2 / AVX-512 where the CPU has them: 3-6x faster than baseline SSE2


def _cpu_id() -> str:
    """What -march=native depends on: the CPU model and its feature flags (the cache is per CPU kind)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags", "Features"))}))


def build() -> ctypes.CDLL:
    """Compile the kernel (or reuse the cached build) and load it; RuntimeError when it cannot be built."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError(f"no C compiler found (CC={os.environ.get('CC', '')!r}; install gcc or clang, or set CC)")
    key = hashlib.sha256("\0".join([SOURCE, cc, *FLAGS, NATIVE, platform.machine(), _cpu_id()]).encode())
    target = _cache_dir() / f"scan_kernel_{key.hexdigest()[:16]}{'.dll' if os.name == 'nt' else '.so'}"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src, out = Path(tmp) / "scan_kernel.c", Path(tmp) / target.name
            src.write_text(SOURCE)
            errors = []
            for flags in ([*FLAGS, NATIVE], FLAGS):  # some compilers reject -march=native: retry without
                cmd = [cc, *flags, str(src), "-o", str(out)]
                result = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if result.returncode == 0:
                    break
                errors.append(f"{' '.join(cmd)}:\n{result.stderr.strip()}")
            else:
                raise RuntimeError("compiling the scan kernel failed: " + "\n".join(errors))
            os.replace(out, target)  # atomic: concurrent first uses never load a half-written file
        log.info("built the CPU scan kernel: %s", target)
    lib = ctypes.CDLL(str(target))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.scan_fwd.argtypes = [ptr] * 8 + [i64] * 8
    lib.scan_bwd.argtypes = [ptr] * 13 + [i64] * 8
    lib.scan_fwd.restype = lib.scan_bwd.restype = None
    return lib


load = functools.cache(build)  # one build/load per process


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scan")


def _run(calls) -> None:
    """Run the kernel calls on torch's thread count (ctypes releases the GIL inside each)."""
    workers = max(1, torch.get_num_threads())
    if workers == 1 or len(calls) == 1:
        for call in calls:
            call()
        return
    for future in [_pool(workers).submit(call) for call in calls]:
        future.result()


def _lanes(dim: int, groups: int) -> int:
    """SIMD lanes per block: the largest of 16, 8, 4, 2, 1 dividing the rows of one group."""
    return next(w for w in (16, 8, 4, 2, 1) if (dim // groups) % w == 0)


def _ptrs(*tensors: torch.Tensor) -> list[int]:
    return [t.data_ptr() for t in tensors]


class CompiledScan:
    """The `_ScanCore` implementation backed by the C kernel."""

    name = "compiled"

    @staticmethod
    def forward(u, delta, A, B, C):
        lib = load()
        batch, dim, L = u.shape
        groups, n = B.shape[1], A.shape[1]
        lanes = _lanes(dim, groups)
        y = torch.empty_like(u)
        last = u.new_empty(batch, dim, n)
        ckpt = u.new_empty(batch, dim, (L + CHUNK - 1) // CHUNK, n)
        blocks = batch * dim // lanes
        parts = min(blocks, 4 * max(1, torch.get_num_threads()))
        bounds = [blocks * i // parts for i in range(parts + 1)]
        args = [*_ptrs(u, delta, A, B, C, y, last, ckpt), dim, groups, L, n, CHUNK, lanes]
        _run([functools.partial(lib.scan_fwd, *args, b0, b1) for b0, b1 in itertools.pairwise(bounds)])
        return y, last, ckpt

    @staticmethod
    def backward(u, delta, A, B, C, ckpt, dy):
        lib = load()
        batch, dim, L = u.shape
        groups, n = B.shape[1], A.shape[1]
        lanes = _lanes(dim, groups)
        per_batch = dim // lanes
        # Tasks: (batch element, slice of its blocks). The slices of one batch element all add into its
        # dB/dC, so each slice gets its own partial buffer (summed below); dA gets a slot per batch element.
        slices = max(1, min(per_batch, -(-2 * max(1, torch.get_num_threads()) // batch)))
        du, ddelta = torch.empty_like(u), torch.empty_like(u)
        dA = A.new_zeros(batch, dim, n)
        dB = B.new_zeros(slices, batch, groups, L, n)
        dC = C.new_zeros(slices, batch, groups, L, n)
        work = u.new_empty(batch, slices, 2 * CHUNK * n * lanes)
        common = _ptrs(u, delta, A, B, C, ckpt, dy, du, ddelta)
        calls = []
        for b in range(batch):
            for s in range(slices):
                b0, b1 = b * per_batch + per_batch * s // slices, b * per_batch + per_batch * (s + 1) // slices
                if b1 > b0:
                    calls.append(functools.partial(lib.scan_bwd, *common, *_ptrs(dA[b], dB[s, b], dC[s, b], work[b, s]),
                                                   dim, groups, L, n, CHUNK, lanes, b0, b1))
        _run(calls)
        return du, ddelta, dA.sum(0), dB.sum(0), dC.sum(0)
