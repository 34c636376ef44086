// Fused selective scan for CPUs: the Mamba (S6) recurrence in one pass over memory, forward and
// backward, built at first use by backbones/mamba_cpu.py (the system C++ compiler, loaded with ctypes).
//
//   h[t] = exp(dt[t] A) h[t-1] + dtu[t] B[t],   y[t] = C[t] . h[t]     (h[-1] = 0)
//
// Layout: dt, dtu, y and the other (L, Bt, D) arrays share the strides sDt (time) and sDb (batch),
// B, C and their gradients (L, Bt, N) share sNt, sNb; the last dimension is contiguous (any order
// of time and batch, e.g. the mixer's batch-first (Bt, L, D) tensors). At = A^T (N, D), contiguous.
// The eager PyTorch scan (backbones/mamba.py) makes ~20 passes over an (L, Bt, N, D) tensor per
// direction; here the state of one batch row and one slab of channels lives in cache (N x 64
// values), the channel loop is vectorised (exp by glibc's libmvec), and nothing of size
// (L, Bt, N, D) is written except the backward's per-row state buffer (L x N x 64, reused).
// Work is split over batch rows (OpenMP), so every output element has one writer.

#include <cmath>
#include <cstdlib>
#include <cstring>

namespace {

const long kSlab = 64;  // channels per slab: the state of a slab (N x 64) stays in L1/L2

template <typename T>
int forward(long L, long Bt, long D, long N, long sDt, long sDb, long sNt, long sNb, const T *dt, const T *dtu,
            const T *Bm, const T *Cm, const T *At, T *y, int threads) {
    int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1) reduction(| : failed)
    for (long b = 0; b < Bt; ++b) {
        T *h = static_cast<T *>(std::malloc(sizeof(T) * N * kSlab));
        if (h == nullptr) { failed = 1; continue; }
        for (long d0 = 0; d0 < D; d0 += kSlab) {
            const long W = D - d0 < kSlab ? D - d0 : kSlab;
            std::memset(h, 0, sizeof(T) * N * kSlab);
            for (long t = 0; t < L; ++t) {
                const long row = t * sDt + b * sDb + d0, rn = t * sNt + b * sNb;
                const T *dtr = dt + row, *ur = dtu + row;
                T *yr = y + row;
                for (long d = 0; d < W; ++d) yr[d] = 0;
                for (long n = 0; n < N; ++n) {
                    const T *Ar = At + n * D + d0;
                    T *hn = h + n * kSlab;
                    const T bn = Bm[rn + n], cn = Cm[rn + n];
#pragma GCC ivdep
                    for (long d = 0; d < W; ++d) {
                        const T hv = std::exp(dtr[d] * Ar[d]) * hn[d] + ur[d] * bn;
                        hn[d] = hv;
                        yr[d] += cn * hv;
                    }
                }
            }
        }
        std::free(h);
    }
    return failed;
}

// Given gy = dL/dy, writes (g = dL/dh[t], gla = dL/d(dt A)[t] = g h[t-1] exp(dt[t] A)):
//   g_dtu[t,b,d] = sum_n g B[t,b,n]        g_ldt[t,b,d] = sum_n gla A[d,n]
//   g_B[t,b,n] = sum_d g dtu[t,b,d]        g_C[t,b,n] = sum_d h[t] gy[t,b,d]
//   g_At[b,n,d] = sum_t gla dt[t,b,d]      (one partial per batch row; the caller sums over b)
// g[t] = gy[t] C[t] + exp(dt[t+1] A) g[t+1]: the recurrence run backwards over states recomputed
// forwards into a per-row buffer, as the CUDA kernel recomputes them instead of saving them.
template <typename T>
int backward(long L, long Bt, long D, long N, long sDt, long sDb, long sNt, long sNb, const T *dt, const T *dtu,
             const T *Bm, const T *Cm, const T *At, const T *gy, T *g_dtu, T *g_ldt, T *g_B, T *g_C, T *g_At,
             int threads) {
    int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1) reduction(| : failed)
    for (long b = 0; b < Bt; ++b) {
        T *H = static_cast<T *>(std::malloc(sizeof(T) * (L + 1) * N * kSlab));  // H[t + 1] = h[t], H[0] = 0
        T *G = static_cast<T *>(std::malloc(sizeof(T) * N * kSlab));            // exp(dt[t+1] A) g[t+1]
        if (H == nullptr || G == nullptr) { std::free(H); std::free(G); failed = 1; continue; }
        T *gA = g_At + b * N * D;
        for (long t = 0; t < L; ++t)
            for (long n = 0; n < N; ++n) g_B[t * sNt + b * sNb + n] = g_C[t * sNt + b * sNb + n] = 0;
        for (long i = 0; i < N * D; ++i) gA[i] = 0;
        for (long d0 = 0; d0 < D; d0 += kSlab) {
            const long W = D - d0 < kSlab ? D - d0 : kSlab;
            std::memset(H, 0, sizeof(T) * N * kSlab);
            for (long t = 0; t < L; ++t) {
                const long row = t * sDt + b * sDb + d0, rn = t * sNt + b * sNb;
                const T *dtr = dt + row, *ur = dtu + row;
                for (long n = 0; n < N; ++n) {
                    const T *Ar = At + n * D + d0, *hp = H + (t * N + n) * kSlab;
                    T *hn = H + ((t + 1) * N + n) * kSlab;
                    const T bn = Bm[rn + n];
#pragma GCC ivdep
                    for (long d = 0; d < W; ++d) hn[d] = std::exp(dtr[d] * Ar[d]) * hp[d] + ur[d] * bn;
                }
            }
            std::memset(G, 0, sizeof(T) * N * kSlab);
            for (long t = L - 1; t >= 0; --t) {
                const long row = t * sDt + b * sDb + d0, rn = t * sNt + b * sNb;
                const T *dtr = dt + row, *ur = dtu + row, *gyr = gy + row;
                T *gu = g_dtu + row, *gl = g_ldt + row;
                for (long d = 0; d < W; ++d) gu[d] = gl[d] = 0;
                for (long n = 0; n < N; ++n) {
                    const T *Ar = At + n * D + d0;
                    const T *hp = H + (t * N + n) * kSlab, *hc = H + ((t + 1) * N + n) * kSlab;
                    T *Gn = G + n * kSlab, *gAn = gA + n * D + d0;
                    const T bn = Bm[rn + n], cn = Cm[rn + n];
                    T sum_c = 0, sum_b = 0;
#pragma GCC ivdep
                    for (long d = 0; d < W; ++d) {
                        const T g = Gn[d] + gyr[d] * cn;
                        const T a = std::exp(dtr[d] * Ar[d]);
                        const T gla = g * hp[d] * a;
                        sum_c += hc[d] * gyr[d];
                        sum_b += g * ur[d];
                        gu[d] += g * bn;
                        gl[d] += gla * Ar[d];
                        gAn[d] += gla * dtr[d];
                        Gn[d] = a * g;
                    }
                    g_C[rn + n] += sum_c;
                    g_B[rn + n] += sum_b;
                }
            }
        }
        std::free(H);
        std::free(G);
    }
    return failed;
}

// torch.nn.functional.softplus (beta 1, threshold 20): torch's CPU log1p is not vectorised, and
// this one elementwise op cost as much as the whole fused forward scan.
template <typename T>
void softplus(long count, const T *x, T *out) {
#pragma GCC ivdep
    for (long i = 0; i < count; ++i) out[i] = x[i] > T(20) ? x[i] : std::log1p(std::exp(x[i]));
}

}  // namespace

// The shapes (L, Bt, D, N) and strides (sDt, sDb, sNt, sNb) in elements come first in every call.
#define SHAPES long L, long Bt, long D, long N, long sDt, long sDb, long sNt, long sNb
#define PASS_SHAPES L, Bt, D, N, sDt, sDb, sNt, sNb

extern "C" {
// Return 0, or 1 when a scratch buffer could not be allocated.
int scan_forward_f32(SHAPES, const float *dt, const float *dtu, const float *B, const float *C, const float *At,
                     float *y, int threads) {
    return forward<float>(PASS_SHAPES, dt, dtu, B, C, At, y, threads);
}
int scan_forward_f64(SHAPES, const double *dt, const double *dtu, const double *B, const double *C,
                     const double *At, double *y, int threads) {
    return forward<double>(PASS_SHAPES, dt, dtu, B, C, At, y, threads);
}
int scan_backward_f32(SHAPES, const float *dt, const float *dtu, const float *B, const float *C, const float *At,
                      const float *gy, float *g_dtu, float *g_ldt, float *g_B, float *g_C, float *g_At, int threads) {
    return backward<float>(PASS_SHAPES, dt, dtu, B, C, At, gy, g_dtu, g_ldt, g_B, g_C, g_At, threads);
}
int scan_backward_f64(SHAPES, const double *dt, const double *dtu, const double *B, const double *C,
                      const double *At, const double *gy, double *g_dtu, double *g_ldt, double *g_B, double *g_C,
                      double *g_At, int threads) {
    return backward<double>(PASS_SHAPES, dt, dtu, B, C, At, gy, g_dtu, g_ldt, g_B, g_C, g_At, threads);
}
void softplus_f32(long count, const float *x, float *out) { softplus<float>(count, x, out); }
void softplus_f64(long count, const double *x, double *out) { softplus<double>(count, x, out); }
}
