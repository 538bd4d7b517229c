"""The compiled CPU selective scan: a small C file, built at first use with the machine's C compiler and cached
(~/.cache/motion_mamba, or $MOTION_MAMBA_CACHE), called through ctypes. It needs no torch or Python headers
and builds in a few seconds.

It computes all of `selective_scan` (delta_bias, softplus, the recurrence, D and the silu(z) gate) and its
backward, on float32 contiguous u, delta, z (b, d, L), A (d, n), B, C (b, g, L, n). The SIMD lanes are W
consecutive channels d of one batch element (W = 16 where d allows), which share B_t and C_t, so the d_state
loop has no horizontal reductions and the state stays in L1. The forward checkpoints the state every `CHUNK`
steps; the backward walks the chunks from the last, recomputes each chunk's states from its checkpoint and
runs the reverse (adjoint) scan over it, so memory is O(L / CHUNK) states per channel, not O(L).
exp and log1p are Cephes-style polynomials written so that gcc/clang vectorise them, without -ffast-math
(which would change the floating-point mode of the whole process). ctypes releases the GIL, so a thread pool
of torch.get_num_threads() workers runs blocks of channels in parallel.
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

typedef struct {
    const float *u, *delta, *A, *B, *C, *D, *z, *delta_bias;  /* D, z, delta_bias may be NULL */
    float *out, *last, *ckpt;                                   /* forward outputs */
    const float *dout;                                          /* backward: gradient of out */
    float *du, *ddelta, *dz;                                    /* backward outputs, per row */
    int64_t dim, groups, L, n, K, softplus;
} Scan;

typedef struct { float *dA, *dB, *dC, *dD, *ddelta_bias, *work; } Slot;  /* one backward task's sums */

/* exp(x), ~2 ulp on [-87, 88] (Cephes expf polynomial). Branch-free, no float->int conversion (rounding by
   the 1.5 * 2^23 trick), so loops calling it vectorise. */
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

/* log(1 + e) for e in [0, 1] (Cephes logf polynomial on 1 + e, corrected by e / ((1 + e) - 1)). */
INLINE float vlog1p(float e) {
    float v = 1.0f + e, big = v > 1.41421356f ? 1.0f : 0.0f;
    float x = v * (1.0f - 0.5f * big) - 1.0f, z = x * x;
    float y = 7.0376836292e-2f;
    y = y * x - 1.1514610310e-1f;
    y = y * x + 1.1676998740e-1f;
    y = y * x - 1.2420140846e-1f;
    y = y * x + 1.4249322787e-1f;
    y = y * x - 1.6668057665e-1f;
    y = y * x + 2.0000714765e-1f;
    y = y * x - 2.4999993993e-1f;
    y = y * x + 3.3333331174e-1f;
    y = y * x * z - 2.12194440e-4f * big - 0.5f * z;
    float lg = x + y + 0.693359375f * big, d = v - 1.0f;
    return d == 0.0f ? e : lg * (e / d);
}

/* delta of row w at step t: (+ delta_bias), (softplus); sig = d(delta)/d(raw delta). */
INLINE void load_step(const Scan *s, int64_t row0, int64_t d0, int64_t t, float *dt, float *sig, float *ut,
                      const int W) {
    for (int w = 0; w < W; w++) {
        float r = s->delta[(row0 + w) * s->L + t] + (s->delta_bias ? s->delta_bias[d0 + w] : 0.0f);
        ut[w] = s->u[(row0 + w) * s->L + t];
        if (s->softplus) {
            float e = vexp(r < 0.0f ? r : -r);  /* exp(-|r|) */
            dt[w] = (r > 0.0f ? r : 0.0f) + vlog1p(e);
            sig[w] = (r >= 0.0f ? 1.0f : e) / (1.0f + e);
        } else {
            dt[w] = r;
            sig[w] = 1.0f;
        }
    }
}

/* A block is W consecutive rows d0..d0+W-1 of one batch element b, all in one group of B/C: the W rows are
   the SIMD lanes and share B_t, C_t. x[k * W + w] is the state of lane w. */
#define BLOCK_SETUP                                                                           \
    const int64_t dim = s->dim, L = s->L, n = s->n, K = s->K, nck = (L + K - 1) / K;          \
    const int64_t b = blk / (dim / W), d0 = (blk % (dim / W)) * W, row0 = b * dim + d0;       \
    const int64_t g = d0 / (dim / s->groups);                                                 \
    const float *Bg = s->B + (b * s->groups + g) * L * n, *Cg = s->C + (b * s->groups + g) * L * n; \
    float *ck = s->ckpt ? s->ckpt + row0 * nck * n : NULL;  /* W rows x nck x n */           \
    float Ab[n * W];                                                                          \
    for (int64_t k = 0; k < n; k++)                                                           \
        for (int w = 0; w < W; w++) Ab[k * W + w] = s->A[(d0 + w) * n + k];

/* x_t = exp(dt A) x_{t-1} + dt u B_t for the W lanes; decay (may be NULL) gets exp(dt A); returns C_t . x_t. */
INLINE void step(const float *Ab, const float *Bt, const float *Ct, const float *dt, const float *dtu,
                 const float *prev, float *x, float *decay, float *y, int64_t n, const int W) {
    for (int w = 0; w < W; w++) y[w] = 0.0f;
    for (int64_t k = 0; k < n; k++) {
        const float bk = Bt[k], ck = Ct[k], *Ak = Ab + k * W, *pk = prev + k * W;
        float *xk = x + k * W;
        #pragma omp simd
        for (int w = 0; w < W; w++) {
            float a = vexp(dt[w] * Ak[w]);
            float v = a * pk[w] + dtu[w] * bk;
            if (decay) decay[k * W + w] = a;
            xk[w] = v;
            y[w] += ck * v;
        }
    }
}

INLINE void fwd_block(const Scan *s, int64_t blk, const int W) {
    BLOCK_SETUP
    float x[n * W], dt[W], sig[W], ut[W], dtu[W], y[W];
    memset(x, 0, sizeof x);
    for (int64_t t = 0; t < L; t++) {
        if (ck && t % K == 0)  /* checkpoints only when a backward will follow */
            for (int w = 0; w < W; w++)
                for (int64_t k = 0; k < n; k++) ck[(w * nck + t / K) * n + k] = x[k * W + w];
        load_step(s, row0, d0, t, dt, sig, ut, W);
        for (int w = 0; w < W; w++) dtu[w] = dt[w] * ut[w];
        step(Ab, Bg + t * n, Cg + t * n, dt, dtu, x, x, NULL, y, n, W);
        for (int w = 0; w < W; w++) {
            float o = y[w] + (s->D ? s->D[d0 + w] * ut[w] : 0.0f);
            if (s->z) {
                float zz = s->z[(row0 + w) * L + t];
                o *= zz / (1.0f + vexp(-zz));
            }
            s->out[(row0 + w) * L + t] = o;
        }
    }
    for (int w = 0; w < W; w++)
        for (int64_t k = 0; k < n; k++) s->last[(row0 + w) * n + k] = x[k * W + w];
}

/* Backward of one block, a chunk of K steps at a time from the last: recompute the chunk's states from its
   checkpoint, then the reverse scan gx = dLoss/dx_t (carried as exp(dt_t A) * G_t). */
INLINE void bwd_block(const Scan *s, const Slot *sl, int64_t blk, const int W) {
    BLOCK_SETUP
    float gx[n * W], dAb[n * W], x0[n * W];
    float dt[W], sig[W], ut[W], dtu[W], gy[W], gB[W], gA[W], dDb[W], dbias[W];
    float *X = sl->work, *decay = X + K * n * W, *Y = decay + K * n * W;
    float *dBg = sl->dB + g * L * n, *dCg = sl->dC + g * L * n;
    memset(gx, 0, sizeof gx);
    memset(dAb, 0, sizeof dAb);
    memset(dDb, 0, sizeof dDb);
    memset(dbias, 0, sizeof dbias);
    for (int64_t c = nck - 1; c >= 0; c--) {
        const int64_t t0 = c * K, m = (L - t0 < K) ? L - t0 : K;
        for (int w = 0; w < W; w++)
            for (int64_t k = 0; k < n; k++) x0[k * W + w] = ck[(w * nck + c) * n + k];
        for (int64_t j = 0; j < m; j++) {
            load_step(s, row0, d0, t0 + j, dt, sig, ut, W);
            for (int w = 0; w < W; w++) dtu[w] = dt[w] * ut[w];
            step(Ab, Bg + (t0 + j) * n, Cg + (t0 + j) * n, dt, dtu, j ? X + (j - 1) * n * W : x0,
                 X + j * n * W, decay + j * n * W, Y + j * W, n, W);
        }
        for (int64_t j = m - 1; j >= 0; j--) {
            const int64_t t = t0 + j;
            load_step(s, row0, d0, t, dt, sig, ut, W);
            for (int w = 0; w < W; w++) {
                const int64_t i = (row0 + w) * L + t;
                float go = s->dout[i], Du = s->D ? s->D[d0 + w] * ut[w] : 0.0f;
                if (s->z) {  /* out = (y + D u) * silu(z) */
                    float zz = s->z[i], sz = 1.0f / (1.0f + vexp(-zz));
                    s->dz[i] = go * (Y[j * W + w] + Du) * sz * (1.0f + zz * (1.0f - sz));
                    go *= zz * sz;
                }
                gy[w] = go;
                dDb[w] += go * ut[w];
                dtu[w] = dt[w] * ut[w];
                gB[w] = 0.0f;
                gA[w] = 0.0f;
            }
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
                    float G = gy[w] * ck_ + gk[w];
                    float ta = G * Xpk[w] * ak[w];
                    sC += gy[w] * Xk[w];
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
                const int64_t i = (row0 + w) * L + t;
                float dd = (ut[w] * gB[w] + gA[w]) * sig[w];
                s->du[i] = dt[w] * gB[w] + (s->D ? gy[w] * s->D[d0 + w] : 0.0f);
                s->ddelta[i] = dd;
                dbias[w] += dd;
            }
        }
    }
    for (int w = 0; w < W; w++) {
        for (int64_t k = 0; k < n; k++) sl->dA[(d0 + w) * n + k] += dAb[k * W + w];
        sl->dD[d0 + w] += dDb[w];
        sl->ddelta_bias[d0 + w] += dbias[w];
    }
}

#define DISPATCH(CALL)                                                            \
    switch (W) {                                                                  \
    case 16: for (int64_t blk = b0; blk < b1; blk++) CALL(16); break;             \
    case 8: for (int64_t blk = b0; blk < b1; blk++) CALL(8); break;               \
    case 4: for (int64_t blk = b0; blk < b1; blk++) CALL(4); break;               \
    case 2: for (int64_t blk = b0; blk < b1; blk++) CALL(2); break;               \
    default: for (int64_t blk = b0; blk < b1; blk++) CALL(1); break;              \
    }

/* Forward over blocks b0 <= blk < b1 of W rows: out, the last state, the state before every chunk. */
void scan_fwd(const Scan *s, int64_t W, int64_t b0, int64_t b1) {
#define FWD(w) fwd_block(s, blk, w)
    DISPATCH(FWD)
}

/* Backward over blocks b0 <= blk < b1, all of one batch element, summing into this task's slot. */
void scan_bwd(const Scan *s, const Slot *slot, int64_t W, int64_t b0, int64_t b1) {
#define BWD(w) bwd_block(s, slot, blk, w)
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
    lib.scan_fwd.argtypes = [ctypes.POINTER(_Scan), ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    lib.scan_bwd.argtypes = [ctypes.POINTER(_Scan), ctypes.POINTER(_Slot), *[ctypes.c_int64] * 3]
    lib.scan_fwd.restype = lib.scan_bwd.restype = None
    return lib


load = functools.cache(build)  # one build/load per process


@functools.cache
def _pool(workers: int, pid: int) -> ThreadPoolExecutor:
    """One pool per process (keyed by pid: a forked child, e.g. a DataLoader worker, gets its own threads)."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scan")


def _run(calls) -> None:
    """Run the kernel calls on torch's thread count (ctypes releases the GIL inside each)."""
    workers = max(1, torch.get_num_threads())
    if workers == 1 or len(calls) == 1:
        for call in calls:
            call()
        return
    for future in [_pool(workers, os.getpid()).submit(call) for call in calls]:
        future.result()


def _lanes(dim: int, groups: int) -> int:
    """SIMD lanes per block: the largest of 16, 8, 4, 2, 1 dividing the rows of one group."""
    return next(w for w in (16, 8, 4, 2, 1) if (dim // groups) % w == 0)


_PTRS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "out", "last", "ckpt", "dout", "du", "ddelta", "dz")


class _Scan(ctypes.Structure):
    _fields_ = [*((name, ctypes.c_void_p) for name in _PTRS),
                *((name, ctypes.c_int64) for name in ("dim", "groups", "L", "n", "K", "softplus"))]


class _Slot(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in ("dA", "dB", "dC", "dD", "ddelta_bias", "work")]


def _scan_struct(dim: int, groups: int, L: int, n: int, softplus: bool, **tensors) -> _Scan:
    """The kernel's argument block; absent tensors (None or not given) become NULL."""
    ptrs = {k: (None if tensors.get(k) is None else tensors[k].data_ptr()) for k in _PTRS}
    return _Scan(**ptrs, dim=dim, groups=groups, L=L, n=n, K=CHUNK, softplus=int(softplus))


class CompiledScan:
    """`selective_scan`'s CPU implementation backed by the C kernel (float32, contiguous, B/C (b, g, L, n))."""

    name = "compiled"

    @staticmethod
    def forward(u, delta, A, B, C, D, z, delta_bias, softplus, for_backward=True):
        lib = load()
        batch, dim, L = u.shape
        groups, n = B.shape[1], A.shape[1]
        lanes = _lanes(dim, groups)
        out = torch.empty_like(u)
        last = u.new_empty(batch, dim, n)
        ckpt = u.new_empty(batch, dim, (L + CHUNK - 1) // CHUNK, n) if for_backward else None
        args = _scan_struct(dim, groups, L, n, softplus, u=u, delta=delta, A=A, B=B, C=C, D=D, z=z,
                            delta_bias=delta_bias, out=out, last=last, ckpt=ckpt)
        blocks = batch * dim // lanes
        parts = min(blocks, 4 * max(1, torch.get_num_threads()))
        bounds = [blocks * i // parts for i in range(parts + 1)]
        _run([functools.partial(lib.scan_fwd, ctypes.byref(args), lanes, b0, b1)
              for b0, b1 in itertools.pairwise(bounds)])
        return out, last, ckpt

    @staticmethod
    def backward(u, delta, A, B, C, D, z, delta_bias, softplus, ckpt, dout):
        lib = load()
        batch, dim, L = u.shape
        groups, n = B.shape[1], A.shape[1]
        lanes = _lanes(dim, groups)
        per_batch = dim // lanes
        du, ddelta = torch.empty_like(u), torch.empty_like(u)
        dz = None if z is None else torch.empty_like(z)
        args = _scan_struct(dim, groups, L, n, softplus, u=u, delta=delta, A=A, B=B, C=C, D=D, z=z,
                            delta_bias=delta_bias, ckpt=ckpt, dout=dout, du=du, ddelta=ddelta, dz=dz)
        # Tasks: (batch element, slice of its blocks). The slices of one batch element all add into its
        # dB/dC, so each slice gets its own partial buffer (summed below); dA, dD, ddelta_bias get a slot per
        # batch element.
        slices = max(1, min(per_batch, -(-2 * max(1, torch.get_num_threads()) // batch)))
        dA, dD, dbias = A.new_zeros(batch, dim, n), u.new_zeros(batch, dim), u.new_zeros(batch, dim)
        dB = B.new_zeros(slices, batch, groups, L, n)
        dC = C.new_zeros(slices, batch, groups, L, n)
        work = u.new_empty(batch, slices, (2 * n + 1) * CHUNK * lanes)
        calls, slots = [], []
        for b in range(batch):
            for s in range(slices):
                b0, b1 = b * per_batch + per_batch * s // slices, b * per_batch + per_batch * (s + 1) // slices
                slots.append(_Slot(*(t.data_ptr() for t in (dA[b], dB[s, b], dC[s, b], dD[b], dbias[b], work[b, s]))))
                calls.append(functools.partial(lib.scan_bwd, ctypes.byref(args), ctypes.byref(slots[-1]),
                                               lanes, b0, b1))
        _run(calls)
        return (du, ddelta, dA.sum(0), dB.sum(0), dC.sum(0), None if D is None else dD.sum(0), dz,
                None if delta_bias is None else dbias.sum(0))
