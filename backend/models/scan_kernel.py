"""The compiled CPU selective scan: a small C file, built at first use with the machine's C compiler and cached
(~/.cache/motion_mamba, or $MOTION_MAMBA_CACHE), called through ctypes. It needs no torch or Python headers
and builds in a few seconds.

It computes all of `selective_scan` (delta_bias, softplus, the recurrence, D and the silu(z) gate) and its
backward, on float32 u, delta, z (b, d, L) in any strided layout (fastest with adjacent channels, i.e.
(b, L, d) memory, which is what the Mamba layer has), A (d, n), B, C (b, g, L, n) with any strides but a unit one
along n (so the Mamba layer's x_proj output is read in place). The SIMD lanes are W
consecutive channels d of one batch element (W = 16 where d allows), which share B_t and C_t, so the d_state
loop has no horizontal reductions and the state stays in L1. Work goes chunk by chunk (`CHUNK` steps): the
forward checkpoints the state before every chunk; the backward walks the chunks from the last, recomputes
each chunk's states from its checkpoint and runs the reverse (adjoint) scan over it, so memory is
O(L / CHUNK) states per channel, not O(L), and time is linear in L.
exp and log1p are Cephes-style polynomials written so that gcc/clang vectorise them, without -ffast-math
(which would change the floating-point mode of the whole process). Blocks of channels run in parallel in an
OpenMP loop on torch.get_num_threads() threads; built with -fopenmp, the kernel shares the OpenMP runtime
torch has loaded, so torch's workers run it instead of competing with it. ctypes releases the GIL meanwhile.
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
import sysconfig
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CHUNK = 32  # steps between checkpointed states; the backward recomputes one chunk at a time

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))

/* A (b, d, L) tensor in any strided layout; adjacent channels ((b, L, d) memory) are the fastest. B and C, which are
   (b, g, L, n), are Views too: sd is then the group stride, and the n numbers of a step are adjacent. */
typedef struct { float *p; int64_t sb, sd, st; } View;

typedef struct {
    View u, delta, z, out, dout, du, ddelta, dz;   /* z may be absent (p NULL); dout, du, ... backward only */
    View B, C;
    const float *A, *D, *delta_bias;               /* D, delta_bias may be NULL */
    float *last, *ckpt;                            /* (b, d, n); (b, d, chunks, n) or NULL */
    int64_t dim, groups, L, n, K, softplus;
} Scan;

/* A backward task's outputs and scratch: dA (b, d, n), dD, ddelta_bias (b, d) shared by all tasks (each row
   is one task's); dB, dC (b, g, L, n) the task's own partial sums; work, carry scratch. */
typedef struct { float *dA, *dB, *dC, *dD, *ddelta_bias, *work, *carry; } Slot;

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

/* Stage channels d0..d0+W-1 of steps t0..t0+m-1 of v into buf (m x W), or write buf back: one contiguous
   copy per step when channels are adjacent ((b, L, d) memory), a small tile transpose otherwise. */
INLINE void stage_in(View v, int64_t b, int64_t d0, int64_t t0, int64_t m, float *buf, const int W) {
    const float *p = v.p + b * v.sb + d0 * v.sd + t0 * v.st;
    if (v.sd == 1)
        for (int64_t j = 0; j < m; j++) memcpy(buf + j * W, p + j * v.st, W * sizeof(float));
    else
        for (int w = 0; w < W; w++)
            for (int64_t j = 0; j < m; j++) buf[j * W + w] = p[w * v.sd + j * v.st];
}

INLINE void stage_out(View v, int64_t b, int64_t d0, int64_t t0, int64_t m, const float *buf, const int W) {
    float *p = v.p + b * v.sb + d0 * v.sd + t0 * v.st;
    if (v.sd == 1)
        for (int64_t j = 0; j < m; j++) memcpy(p + j * v.st, buf + j * W, W * sizeof(float));
    else
        for (int w = 0; w < W; w++)
            for (int64_t j = 0; j < m; j++) p[w * v.sd + j * v.st] = buf[j * W + w];
}

/* Step sizes of the lanes from raw delta: (+ delta_bias), (softplus); sig = d(dt)/d(delta). */
INLINE void step_size(const Scan *s, int64_t d0, const float *raw, float *dt, float *sig, const int W) {
    for (int w = 0; w < W; w++) {
        float r = raw[w] + (s->delta_bias ? s->delta_bias[d0 + w] : 0.0f);
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
   the SIMD lanes and share B_t, C_t. x[k * W + w] is the state of lane w. A task (one call) runs its range
   of blocks chunk by chunk (K steps), so that a chunk's B, C (and dB, dC) stay in cache while the blocks
   pass over it, and the per-step inputs are staged chunk-wise: time and memory traffic stay linear in L. */
#define BLOCK_SETUP                                                                           \
    const int64_t dim = s->dim, L = s->L, n = s->n, K = s->K, nck = (L + K - 1) / K;          \
    const int64_t b = blk / (dim / W), d0 = (blk % (dim / W)) * W, row0 = b * dim + d0;       \
    const int64_t g = d0 / (dim / s->groups);                                                 \
    const int64_t t0 = c * K, m = (L - t0 < K) ? L - t0 : K;                                  \
    const float *Bg = s->B.p + b * s->B.sb + g * s->B.sd, *Cg = s->C.p + b * s->C.sb + g * s->C.sd; \
    float *ck = s->ckpt ? s->ckpt + (blk * nck + c) * n * W : NULL;  /* state before chunk c */ \
    float Ab[n * W], U[K * W], DT[K * W], SIG[K * W], Z[K * W];                               \
    for (int64_t k = 0; k < n; k++)                                                           \
        for (int w = 0; w < W; w++) Ab[k * W + w] = s->A[(d0 + w) * n + k];                   \
    stage_in(s->u, b, d0, t0, m, U, W);                                                       \
    stage_in(s->delta, b, d0, t0, m, DT, W);                                                  \
    if (s->z.p) stage_in(s->z, b, d0, t0, m, Z, W);                                           \
    for (int64_t j = 0; j < m; j++) step_size(s, d0, DT + j * W, DT + j * W, SIG + j * W, W);

/* x_t = exp(dt A) x_{t-1} + dt u B_t for the W lanes; decay (may be NULL) gets exp(dt A); y = C_t . x_t. */
INLINE void step(const float *Ab, const float *Bt, const float *Ct, const float *dt, const float *ut,
                 const float *prev, float *x, float *decay, float *y, int64_t n, const int W) {
    float dtu[W];
    for (int w = 0; w < W; w++) {
        y[w] = 0.0f;
        dtu[w] = dt[w] * ut[w];
    }
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

/* Forward of chunk c of one block; x (n * W) carries the block's state from chunk to chunk. */
INLINE void fwd_chunk(const Scan *s, int64_t blk, int64_t c, float *x, const int W) {
    BLOCK_SETUP
    float O[K * W];
    if (ck)  /* checkpoints only when a backward will follow */
        memcpy(ck, x, n * W * sizeof(float));
    for (int64_t j = 0; j < m; j++) {
        const float *ut = U + j * W;
        float *y = O + j * W;
        step(Ab, Bg + (t0 + j) * s->B.st, Cg + (t0 + j) * s->C.st, DT + j * W, ut, x, x, NULL, y, n, W);
        if (s->D)
            for (int w = 0; w < W; w++) y[w] += s->D[d0 + w] * ut[w];
        if (s->z.p)
            for (int w = 0; w < W; w++) y[w] *= Z[j * W + w] / (1.0f + vexp(-Z[j * W + w]));
    }
    stage_out(s->out, b, d0, t0, m, O, W);
    if (t0 + m == L)
        for (int w = 0; w < W; w++)
            for (int64_t k = 0; k < n; k++) s->last[(row0 + w) * n + k] = x[k * W + w];
}

/* Per-block sums carried across the backward's chunks: gx = dLoss/dx (times the decay), dA, dD, ddelta_bias. */
typedef struct { float *gx, *dA, *dD, *dbias; } Carry;

/* Backward of chunk c of one block: recompute the chunk's states from its checkpoint, then run the reverse
   scan over it, G_t = dLoss/dx_t = gy_t C_t + exp(dt_{t+1} A) G_{t+1}. */
INLINE void bwd_chunk(const Scan *s, const Slot *sl, int64_t blk, int64_t c, Carry cr, const int W) {
    BLOCK_SETUP
    float x0[n * W], GY[K * W], DU[K * W], DD[K * W], DZ[K * W], gB[W], gA[W];
    float *X = sl->work, *decay = X + K * n * W, *Y = decay + K * n * W;
    float *dBg = sl->dB + (b * s->groups + g) * L * n, *dCg = sl->dC + (b * s->groups + g) * L * n;
    memcpy(x0, ck, n * W * sizeof(float));
    for (int64_t j = 0; j < m; j++)
        step(Ab, Bg + (t0 + j) * s->B.st, Cg + (t0 + j) * s->C.st, DT + j * W, U + j * W, j ? X + (j - 1) * n * W : x0,
             X + j * n * W, decay + j * n * W, Y + j * W, n, W);
    stage_in(s->dout, b, d0, t0, m, GY, W);
    if (s->z.p)  /* out = (y + D u) * silu(z): gradients of z, and of y + D u (into GY) */
        for (int64_t i = 0; i < m * W; i++) {
            const int w = (int)(i % W);
            float zz = Z[i], sz = 1.0f / (1.0f + vexp(-zz));
            float pre = Y[i] + (s->D ? s->D[d0 + w] * U[i] : 0.0f);
            DZ[i] = GY[i] * pre * sz * (1.0f + zz * (1.0f - sz));
            GY[i] *= zz * sz;
        }
    for (int64_t j = m - 1; j >= 0; j--) {
        const int64_t t = t0 + j;
        const float *dt = DT + j * W, *ut = U + j * W, *gy = GY + j * W;
        float dtu[W];
        for (int w = 0; w < W; w++) {
            cr.dD[w] += gy[w] * ut[w];
            dtu[w] = dt[w] * ut[w];
            gB[w] = 0.0f;
            gA[w] = 0.0f;
        }
        const float *Bt = Bg + t * s->B.st, *Ct = Cg + t * s->C.st, *Xj = X + j * n * W, *aj = decay + j * n * W;
        const float *Xp = j > 0 ? X + (j - 1) * n * W : x0;
        float *dBt = dBg + t * n, *dCt = dCg + t * n;
        for (int64_t k = 0; k < n; k++) {
            const float bk = Bt[k], ck_ = Ct[k];
            const float *Xpk = Xp + k * W, *Xk = Xj + k * W, *ak = aj + k * W, *Ak = Ab + k * W;
            float *gk = cr.gx + k * W, *dAk = cr.dA + k * W;
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
            DD[j * W + w] = (ut[w] * gB[w] + gA[w]) * SIG[j * W + w];
            DU[j * W + w] = dt[w] * gB[w] + (s->D ? gy[w] * s->D[d0 + w] : 0.0f);
            cr.dbias[w] += DD[j * W + w];
        }
    }
    stage_out(s->du, b, d0, t0, m, DU, W);
    stage_out(s->ddelta, b, d0, t0, m, DD, W);
    if (s->z.p) stage_out(s->dz, b, d0, t0, m, DZ, W);
}

/* Forward of blocks b0 <= blk < b1; state: (b1 - b0) * n * W zeros. */
INLINE void fwd_task(const Scan *s, int64_t b0, int64_t b1, float *state, const int W) {
    for (int64_t c = 0; c * s->K < s->L; c++)
        for (int64_t blk = b0; blk < b1; blk++) fwd_chunk(s, blk, c, state + (blk - b0) * s->n * W, W);
}

/* Backward of blocks b0 <= blk < b1: du, ddelta, dz of their rows; dA, dD, ddelta_bias per row (b, d);
   dB, dC summed into this task's own (b, g, L, n) buffers. */
INLINE void bwd_task(const Scan *s, const Slot *sl, int64_t b0, int64_t b1, const int W) {
    const int64_t n = s->n, per = 2 * n * W + 2 * W;  /* Carry floats per block, in sl->carry (zeros) */
    for (int64_t c = (s->L - 1) / s->K; c >= 0; c--)
        for (int64_t blk = b0; blk < b1; blk++) {
            float *p = sl->carry + (blk - b0) * per;
            bwd_chunk(s, sl, blk, c, (Carry){p, p + n * W, p + 2 * n * W, p + 2 * n * W + W}, W);
        }
    for (int64_t blk = b0; blk < b1; blk++) {
        const int64_t row0 = blk * W;  /* = b * dim + d0 */
        const float *p = sl->carry + (blk - b0) * per;
        for (int w = 0; w < W; w++) {
            for (int64_t k = 0; k < n; k++) sl->dA[(row0 + w) * n + k] = p[n * W + k * W + w];
            sl->dD[row0 + w] = p[2 * n * W + w];
            sl->ddelta_bias[row0 + w] = p[2 * n * W + W + w];
        }
    }
}

#define DISPATCH(CALL)                \
    switch (W) {                      \
    case 16: CALL(16); break;         \
    case 8: CALL(8); break;           \
    case 4: CALL(4); break;           \
    case 2: CALL(2); break;           \
    default: CALL(1); break;          \
    }

/* The tasks i < tasks (block ranges bounds[i] .. bounds[i + 1]) in parallel. Compiled with -fopenmp, this is
   the OpenMP runtime torch itself runs on (libgomp.so.1, already loaded by torch): one thread team, no
   second pool competing with torch's spinning workers. */
void scan_fwd(const Scan *s, int64_t W, const int64_t *bounds, int64_t tasks, float *state, int64_t threads) {
    #pragma omp parallel for schedule(static, 1) num_threads(threads) if (threads > 1 && tasks > 1)
    for (int64_t i = 0; i < tasks; i++) {
        const int64_t b0 = bounds[i], b1 = bounds[i + 1];
        float *st = state + b0 * s->n * W;
#define FWD(w) fwd_task(s, b0, b1, st, w)
        DISPATCH(FWD)
    }
}

void scan_bwd(const Scan *s, const Slot *slots, int64_t W, const int64_t *bounds, int64_t tasks,
              int64_t threads) {
    #pragma omp parallel for schedule(static, 1) num_threads(threads) if (threads > 1 && tasks > 1)
    for (int64_t i = 0; i < tasks; i++) {
        const int64_t b0 = bounds[i], b1 = bounds[i + 1];
#define BWD(w) bwd_task(s, slots + i, b0, b1, w)
        DISPATCH(BWD)
    }
}

/* The Mamba layer's depthwise causal convolution and SiLU, forward only: out[b, t, c] = silu(sum_k wt[k, c]
   x[b, t - K + 1 + k, c] + bias[c]) (the taps in order, then the bias: the PyTorch path's order). x (b, L, d) in
   any strides; weight (d, K) (a Conv1d's, contiguous), out (b, L, d) contiguous; bias may be NULL. Returns 0, or
   -1 when the taps' scratch cannot be allocated. */
int conv_silu(const float *x, int64_t sb, int64_t st, int64_t sd, const float *weight, const float *bias, float *out,
              int64_t batch, int64_t L, int64_t d, int64_t K) {
    float *wt = malloc((size_t)(K * d) * sizeof(float));  /* the taps as (K, d): tap k of adjacent channels adjacent */
    if (!wt) return -1;
    for (int64_t c = 0; c < d; c++)
        for (int64_t k = 0; k < K; k++) wt[k * d + c] = weight[c * K + k];
    for (int64_t b = 0; b < batch; b++)
        for (int64_t t = 0; t < L; t++) {
            float *o = out + (b * L + t) * d;
            for (int64_t c = 0; c < d; c++) o[c] = 0.0f;
            for (int64_t k = 0; k < K; k++) {
                const int64_t from = t - K + 1 + k;
                if (from < 0) continue;  /* the zero padding before the first step */
                const float *xs = x + b * sb + from * st, *w = wt + k * d;
                #pragma omp simd
                for (int64_t c = 0; c < d; c++) o[c] += w[c] * xs[c * sd];
            }
            #pragma omp simd
            for (int64_t c = 0; c < d; c++) {
                const float v = o[c] + (bias ? bias[c] : 0.0f);
                o[c] = v / (1.0f + vexp(-v));
            }
        }
    free(wt);
    return 0;
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
    """$MOTION_MAMBA_CACHE, else ~/.cache/motion_mamba; a temporary folder where that is not writable."""
    root = os.environ.get("MOTION_MAMBA_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    path = Path(root) / "motion_mamba"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"motion_mamba-{getattr(os, 'getuid', lambda: 'user')()}"


FLAGS = ["-O3", "-std=c99", "-fPIC", "-shared", "-fopenmp-simd", "-fno-math-errno"]
OPENMP = "-fopenmp"  # threads over blocks of channels; without it (e.g. Apple clang) the kernel runs serially
NATIVE = "-march=native"  # AVX2 / AVX-512 where the CPU has them: 3-6x faster than baseline SSE2
# gcc and clang default to 256-bit vectors even where the CPU has AVX-512; the scan's 16 lanes fill one 512-bit
# register: ~20% faster there (x86 only: other compilers and targets reject the flag, and the build retries without)
WIDE = "-mprefer-vector-width=512"


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
    key = hashlib.sha256("\0".join([SOURCE, cc, *FLAGS, OPENMP, NATIVE, WIDE, platform.machine(), _cpu_id()]).encode())
    target = _cache_dir() / f"scan_kernel_{key.hexdigest()[:16]}{'.dll' if os.name == 'nt' else '.so'}"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src, out = Path(tmp) / "scan_kernel.c", Path(tmp) / target.name
            src.write_text(SOURCE)
            errors = []
            # some compilers reject the vector width, -march=native or -fopenmp: retry without
            for flags in ([*FLAGS, OPENMP, NATIVE, WIDE], [*FLAGS, OPENMP, NATIVE], [*FLAGS, OPENMP], FLAGS):
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
    lib.scan_fwd.argtypes = [ctypes.POINTER(_Scan), i64, ptr, i64, ptr, i64]
    lib.scan_bwd.argtypes = [ctypes.POINTER(_Scan), ctypes.POINTER(_Slot), i64, ptr, i64, i64]
    lib.conv_silu.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, i64, i64, i64, i64]
    lib.scan_fwd.restype = lib.scan_bwd.restype = None
    lib.conv_silu.restype = ctypes.c_int
    return lib


load = functools.cache(build)  # one build/load per process


def _lanes(dim: int, groups: int) -> int:
    """SIMD lanes per block: the largest of 16, 8, 4, 2, 1 dividing the rows of one group."""
    return next(w for w in (16, 8, 4, 2, 1) if (dim // groups) % w == 0)


class _View(ctypes.Structure):
    _fields_ = [("p", ctypes.c_void_p), *((name, ctypes.c_int64) for name in ("sb", "sd", "st"))]


_VIEWS = ("u", "delta", "z", "out", "dout", "du", "ddelta", "dz", "B", "C")
_PTRS = ("A", "D", "delta_bias", "last", "ckpt")


class _Scan(ctypes.Structure):
    _fields_ = [*((name, _View) for name in _VIEWS), *((name, ctypes.c_void_p) for name in _PTRS),
                *((name, ctypes.c_int64) for name in ("dim", "groups", "L", "n", "K", "softplus"))]


class _Slot(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in ("dA", "dB", "dC", "dD", "ddelta_bias", "work", "carry")]


def _scan_struct(dim: int, groups: int, L: int, n: int, softplus: bool, **tensors) -> _Scan:
    """The kernel's argument block; absent tensors (None or not given) become NULL. B and C (b, g, L, n) need a unit
    stride along n."""
    def view(t):
        return _View() if t is None else _View(t.data_ptr(), *t.stride()[:3])

    return _Scan(**{k: view(tensors.get(k)) for k in _VIEWS},
                 **{k: (None if tensors.get(k) is None else tensors[k].data_ptr()) for k in _PTRS},
                 dim=dim, groups=groups, L=L, n=n, K=CHUNK, softplus=int(softplus))


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    """An uninitialised (b, d, L) tensor laid out like t when t's channels are adjacent ((b, L, d) memory,
    the Mamba layer's), else contiguous (b, d, L) (mamba_ssm's layout)."""
    batch, dim, length = t.shape
    if t.stride(1) == 1 and dim > 1:
        return t.new_empty(batch, length, dim).transpose(1, 2)
    return t.new_empty(batch, dim, length)


def _tasks(blocks: int, steps: int) -> tuple[ctypes.Array, int, int]:
    """Block ranges, one per thread (fewer when there is too little work: a task should scan at least ~512
    block-steps): (bounds array, number of tasks, threads)."""
    threads = max(1, torch.get_num_threads())
    parts = min(blocks, threads, max(1, blocks * steps // 512))
    return (ctypes.c_int64 * (parts + 1))(*(blocks * i // parts for i in range(parts + 1))), parts, threads


def conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """silu(depthwise causal conv1d over time) of x (b, L, d) float32, any strides, with a Conv1d's weight
    (d, 1, K) and bias (d,): the Mamba layer's, forward only (no autograd), as one contiguous (b, L, d) tensor."""
    batch, length, dim = x.shape
    w = weight.detach().contiguous()
    b = None if bias is None else bias.detach().contiguous()
    out = x.new_empty(batch, length, dim)
    if load().conv_silu(x.data_ptr(), *x.stride(), w.data_ptr(), None if b is None else b.data_ptr(), out.data_ptr(),
                        batch, length, dim, w.shape[-1]):
        raise MemoryError(f"conv_silu: no memory for the taps of {dim} channels")
    return out


class CompiledScan:
    """`selective_scan`'s CPU implementation on the C kernel: float32; u, delta, z (b, d, L) in any layout
    (adjacent channels fastest); A, D, delta_bias contiguous; B, C (b, g, L, n) with a unit stride along n."""

    name = "compiled"

    @staticmethod
    def forward(u, delta, A, B, C, D, z, delta_bias, softplus, for_backward=True):
        lib = load()
        batch, dim, L = u.shape
        groups, n = B.shape[1], A.shape[1]
        lanes = _lanes(dim, groups)
        out = _empty_like(u)
        last = u.new_empty(batch, dim, n)
        # the state before every chunk, per block: (blocks, chunks, n, lanes)
        ckpt = u.new_empty(batch * dim * ((L + CHUNK - 1) // CHUNK) * n) if for_backward else None
        args = _scan_struct(dim, groups, L, n, softplus, u=u, delta=delta, A=A, B=B, C=C, D=D, z=z,
                            delta_bias=delta_bias, out=out, last=last, ckpt=ckpt)
        state = u.new_zeros(batch * dim * n)  # each block's running state, (blocks, n, lanes)
        bounds, tasks, threads = _tasks(batch * dim // lanes, L)
        lib.scan_fwd(ctypes.byref(args), lanes, bounds, tasks, state.data_ptr(), threads)
        return out, last, (u, delta, A, B, C, D, z, delta_bias, ckpt)

    @staticmethod
    def backward(saved, softplus, dout):
        u, delta, A, B, C, D, z, delta_bias, ckpt = saved
        lib = load()
        batch, dim, L = u.shape
        groups, n = B.shape[1], A.shape[1]
        lanes = _lanes(dim, groups)
        du, ddelta = _empty_like(u), _empty_like(delta)
        dz = None if z is None else _empty_like(z)
        dout = dout.float()
        args = _scan_struct(dim, groups, L, n, softplus, u=u, delta=delta, A=A, B=B, C=C, D=D, z=z,
                            delta_bias=delta_bias, ckpt=ckpt, dout=dout, du=du, ddelta=ddelta, dz=dz)
        bounds, tasks, threads = _tasks(batch * dim // lanes, L)
        dA, dD, dbias = A.new_empty(batch, dim, n), u.new_empty(batch, dim), u.new_empty(batch, dim)
        dB = B.new_zeros(tasks, batch, groups, L, n)  # per task: its blocks' channels summed
        dC = C.new_zeros(tasks, batch, groups, L, n)
        work = u.new_empty(tasks, (2 * n + 1) * CHUNK * lanes)  # a chunk's states, decays, outputs
        carry = u.new_zeros(batch * dim // lanes, 2 * (n + 1) * lanes)  # per block: gx, dA, dD, ddelta_bias
        slots = (_Slot * tasks)(*(_Slot(*(t.data_ptr() for t in (dA, dB[i], dC[i], dD, dbias, work[i],
                                                                   carry[bounds[i]])))
                                  for i in range(tasks)))
        lib.scan_bwd(ctypes.byref(args), slots, lanes, bounds, tasks, threads)
        return (du, ddelta, dA.sum(0), dB.sum(0), dC.sum(0), None if D is None else dD.sum(0), dz,
                None if delta_bias is None else dbias.sum(0))
