/* Rank-r products of a LoRA step on CPU, fp32: llama-lora's one hand-written kernel (see lean/native.py).
 *
 * A LoRA layer's adapter work is four products with one side only r (16-64) wide:
 *   h  = x A^T        (T x r)    proj:  out = s * M P,     M = x (T x n), P = A^T (n x r)
 *   gh = s g B        (T x r)    proj:  M = g, P = B
 *   dB = s g^T h      (out x r)  wgrad: out = s * M^T Q,   M = g, Q = h
 *   dA = gh^T x       (r x in)   wgrad: M = x, Q = gh (written transposed, in x r)
 * BLAS runs these well below its big-matmul FLOP/s on CPU (it packs the long operand and splits two
 * threads poorly over r columns; benchmarks/README.md, range S13). Here every element of M is read once, broadcast against
 * one r-wide row held in vector registers (RB rows of M at a time, so each load of a P or out row
 * serves RB multiply-adds), and `both` computes gh and dB in the same pass over g. Threads split the
 * T rows; wgrad's threads accumulate privately and sum at the end. GCC/Clang vector extensions: AVX-512
 * where -march=native has it, narrower SIMD otherwise.
 */
#include <stdlib.h>
#include <string.h>
#include <omp.h>

typedef float v16 __attribute__((vector_size(64)));

static inline v16 ld(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, v16 v) { memcpy(p, &v, sizeof v); }

/* Rows [t0, t1) of M, W vectors (R = 16 W columns), RB rows per inner block.
 * proj: out[t] = s * sum_o M[t,o] P[o]    wgrad: acc[o] += sum_t M[t,o] (s Q[t])    (either may be NULL) */
#define DEFINE_BLOCK(NAME, W, RB, HAS_P, HAS_Q)                                                                               \
static void NAME(const float *M, long ldm, const float *P, const float *Q, long ldq, float s,    \
                             long t0, long t1, long n, float *out, float *acc) {                          \
    long t = t0;                                                                                          \
    for (; t + RB <= t1; t += RB) {                                                                       \
        v16 a[RB][W], q[RB][W];                                                                           \
        const float *m[RB];                                                                               \
        for (int i = 0; i < RB; i++) {                                                                    \
            m[i] = M + (t + i) * ldm;                                                                     \
            for (int w = 0; w < W; w++) {                                                                 \
                a[i][w] = (v16){0};                                                                       \
                q[i][w] = HAS_Q ? ld(Q + (t + i) * ldq + 16 * w) * s : (v16){0};                              \
            }                                                                                             \
        }                                                                                                 \
        for (long o = 0; o < n; o++) {                                                                    \
            float mv[RB];                                                                                 \
            for (int i = 0; i < RB; i++) mv[i] = m[i][o];                                                 \
            for (int w = 0; w < W; w++) {                                                                 \
                if (HAS_P) {                                                                                  \
                    v16 p = ld(P + (o * W + w) * 16);                                                     \
                    for (int i = 0; i < RB; i++) a[i][w] += mv[i] * p;                                    \
                }                                                                                         \
                if (HAS_Q) {                                                                                  \
                    v16 r = ld(acc + (o * W + w) * 16);                                                   \
                    for (int i = 0; i < RB; i++) r += mv[i] * q[i][w];                                    \
                    st(acc + (o * W + w) * 16, r);                                                        \
                }                                                                                         \
            }                                                                                             \
        }                                                                                                 \
        if (HAS_P)                                                                                            \
            for (int i = 0; i < RB; i++)                                                                  \
                for (int w = 0; w < W; w++) st(out + (t + i) * 16 * W + 16 * w, a[i][w] * s);             \
    }                                                                                                     \
    for (; t < t1; t++) { /* the last < RB rows */                                                        \
        v16 a[W], q[W];                                                                                   \
        for (int w = 0; w < W; w++) { a[w] = (v16){0}; q[w] = HAS_Q ? ld(Q + t * ldq + 16 * w) * s : (v16){0}; } \
        for (long o = 0; o < n; o++) {                                                                    \
            float mv = M[t * ldm + o];                                                                    \
            for (int w = 0; w < W; w++) {                                                                 \
                if (HAS_P) a[w] += mv * ld(P + (o * W + w) * 16);                                             \
                if (HAS_Q) st(acc + (o * W + w) * 16, ld(acc + (o * W + w) * 16) + mv * q[w]);                \
            }                                                                                             \
        }                                                                                                 \
        if (HAS_P) for (int w = 0; w < W; w++) st(out + t * 16 * W + 16 * w, a[w] * s);                       \
    }                                                                                                     \
}

/* One function per width and mode, rows per block within the 32 vector registers of AVX-512: RB*W
 * accumulators (proj) or RB*W scaled Q rows (wgrad), both for `both`. The larger RB, the more
 * multiply-adds each broadcast and row load feeds: RB=8, or the mode tested at run time inside the loop,
 * measured about half as fast as these blocks (r=16, T=750, 2 cores). */
#define DEFINE_WIDTH(W, RB_ONE, RB_BOTH)                                                                  \
    DEFINE_BLOCK(proj_##W, W, RB_ONE, 1, 0)                                                               \
    DEFINE_BLOCK(wgrad_##W, W, RB_ONE, 0, 1)                                                              \
    DEFINE_BLOCK(both_##W, W, RB_BOTH, 1, 1)
DEFINE_WIDTH(1, 16, 8)
DEFINE_WIDTH(2, 8, 4)
DEFINE_WIDTH(3, 8, 2)
DEFINE_WIDTH(4, 6, 2)

typedef void (*block_fn)(const float *, long, const float *, const float *, long, float, long, long, long,
                         float *, float *);
static block_fn pick(int w, int has_p, int has_q) {
    static const block_fn table[4][3] = {{proj_1, wgrad_1, both_1}, {proj_2, wgrad_2, both_2},
                                         {proj_3, wgrad_3, both_3}, {proj_4, wgrad_4, both_4}};
    if (w < 1 || w > 4 || !(has_p || has_q)) return 0;
    return table[w - 1][has_p && has_q ? 2 : has_q ? 1 : 0];
}

/* The entry point. M: T x n with row stride ldm. P: n x 16W contiguous, or NULL. Q: T x 16W with row
 * stride ldq, or NULL. proj (T x 16W, contiguous) = s M P; wgrad (n x 16W, contiguous) = s M^T Q.
 * Returns 0, or -1 for an unsupported width or a failed allocation (nothing written then). */
int lowrank(const float *M, long ldm, const float *P, const float *Q, long ldq, float s, long T, long n, int w,
            int threads, float *proj, float *wgrad) {
    block_fn fn = pick(w, P != 0, Q != 0);
    if (!fn) return -1;
    if (threads > T / 64) threads = (int)(T / 64); /* a thread's share below 64 rows is not worth waking it */
    if (threads < 1) threads = 1;
    long width = 16L * w;
    float *extra = NULL; /* wgrad partial sums of threads 1.. */
    if (Q && threads > 1) {
        extra = (float *)malloc(sizeof(float) * (size_t)(threads - 1) * (size_t)n * (size_t)width);
        if (!extra) return -1;
    }
    #pragma omp parallel num_threads(threads)
    {
        int id = omp_get_thread_num(), nt = omp_get_num_threads();
        long t0 = T * id / nt, t1 = T * (id + 1) / nt;
        float *acc = NULL;
        if (Q) {
            acc = id == 0 ? wgrad : extra + (size_t)(id - 1) * n * width;
            memset(acc, 0, sizeof(float) * (size_t)n * width);
        }
        fn(M, ldm, P, Q, ldq, s, t0, t1, n, proj, acc);
        if (Q && nt > 1) {
            #pragma omp barrier
            long o0 = n * id / nt * width, o1 = n * (id + 1) / nt * width;
            for (int k = 1; k < nt; k++) {
                const float *part = extra + (size_t)(k - 1) * n * width;
                for (long j = o0; j < o1; j++) wgrad[j] += part[j];
            }
        }
    }
    free(extra);
    return 0;
}
