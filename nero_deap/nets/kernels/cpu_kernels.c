/* CPU kernels for training in bf16 channels_last, loaded by nero_deap/native.py through ctypes.
 *
 * A channels_last (N, C, H, W) tensor is, in memory, a (rows = N * H * W, C) matrix: each row holds the C
 * channels of one pixel.  Every loop here walks rows and vectorises over channels.  Arithmetic is float32
 * per element; per-channel sums go through float32 over blocks of BLOCK rows and double across blocks, and
 * the variance is taken around a per-channel shift (the first row) so that E[x^2] - E[x]^2 cannot cancel.
 * Threads split the rows into fixed ranges and their partial sums are added in thread order, so results
 * depend on the thread count only, never on scheduling.  Every multiply-add that decides a result is an
 * explicit fmaf (built with -ffp-contract=off): the fused and separate forms, and a ReLU mask recomputed in
 * a backward, then round alike wherever the compiler inlines them.  No Python API: plain C over raw pointers.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

#define BLOCK 64

static inline float bf16_to_float(uint16_t b) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)b << 16;
    return v.f;
}

/* Round to nearest even, as torch rounds float32 to bf16 (NaNs stay quiet NaNs). */
static inline uint16_t float_to_bf16(float f) {
    union { uint32_t u; float f; } v;
    v.f = f;
    uint32_t u = v.u;
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = (u >> 16) | 0x40u;
    return (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? nan : rounded);
}

/* Whether a gradient passes the ReLU after BatchNorm: whether the forward's output, relu(bf16(z)) with
 * z = x * scale + offset, was not <= 0 (as torch's threshold_backward on that output: a NaN passes).  bf16(z)
 * <= 0 exactly when z <= 2^-134: anything above rounds up to bf16's smallest subnormal, 2^-133.  One compare
 * instead of a rounding: the backward with the ReLU ran at 27 ms instead of 16 without it when it rounded. */
static inline int relu_passes(float x, float scale, float offset) {
    return !(fmaf(x, scale, offset) <= 0x1p-134f);
}

/* Where a gradient comes from a max-pool that tiles its input (kh == sh, kw == sw, H == OH * kh,
 * W == OW * kw), fused with the BatchNorm before it: the pool's output gradient and its where[] bytes. */
typedef struct {
    const uint8_t *where;
    int64_t H, W, OH, OW;
    int kh, kw;
} Pooled;

/* Row r (pixel (n, h, w)) of the gradient a tiling max-pool hands back: its window's output gradient where
 * this pixel won the window and passes, else 0 (what max_pool_backward writes, as float). */
static void pooled_gradient_row(const uint16_t *dy, const Pooled *pool, int64_t r, int64_t C, float *g) {
    int64_t n = r / (pool->H * pool->W), hw = r % (pool->H * pool->W), h = hw / pool->W, w = hw % pool->W;
    int64_t o = ((n * pool->OH + h / pool->kh) * pool->OW + w / pool->kw) * C;
    uint8_t mine = (uint8_t)(0x80 | ((h % pool->kh) * pool->kw + w % pool->kw));
    const uint16_t *gr = dy + o;
    const uint8_t *wr = pool->where + o;
    #pragma omp simd
    for (int64_t c = 0; c < C; c++) g[c] = wr[c] == mine ? bf16_to_float(gr[c]) : 0.0f;
}

/* Per-channel sums over rows of a and of a * (b - centre) (b = NULL: of a and of (a - centre)^2, where
 * centre = shift), into sum_a and sum_ab: float32 within blocks of BLOCK rows, double across them.  With
 * scale (and offset), a counts only where relu_passes(b, scale, offset).  With pool, a's rows are those
 * pooled_gradient_row makes of it (the same numbers in the same order as summing max_pool_backward's
 * output).  Returns 0, or -1 when out of memory. */
static int channel_sums(const uint16_t *a, const Pooled *pool, const uint16_t *b, const float *centre,
                        const float *scale, const float *offset, int64_t rows, int64_t C, double *sum_a,
                        double *sum_ab, int threads) {
    double *partial = calloc((size_t)threads * (size_t)C * 2, sizeof(double));
    if (!partial) return -1;
    int failed = 0, team = threads;
    #pragma omp parallel num_threads(threads)
    {
        /* split by the threads OpenMP actually started (OMP_THREAD_LIMIT, OMP_DYNAMIC may give fewer) */
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        if (t == 0) team = nt;
        int64_t lo = rows * t / nt, hi = rows * (t + 1) / nt;
        double *pa = partial + (size_t)t * C * 2, *pab = pa + C;
        /* each thread's own allocations: one block for all threads' float sums ran 1.3-2.7x slower */
        float *ba = malloc((size_t)C * sizeof(float)), *bab = malloc((size_t)C * sizeof(float));
        float *pooled = pool ? malloc((size_t)C * sizeof(float)) : NULL;
        if (!ba || !bab || (pool && !pooled)) {
            #pragma omp atomic write
            failed = 1;
            hi = lo;
        }
        for (int64_t r0 = lo; r0 < hi; r0 += BLOCK) {
            int64_t r1 = r0 + BLOCK < hi ? r0 + BLOCK : hi;
            for (int64_t c = 0; c < C; c++) { ba[c] = 0.0f; bab[c] = 0.0f; }
            for (int64_t r = r0; r < r1; r++) {
                const uint16_t *ar = pool ? NULL : a + r * C;
                if (pool) {
                    const uint16_t *br = b + r * C;
                    pooled_gradient_row(a, pool, r, C, pooled);
                    #pragma omp simd
                    for (int64_t c = 0; c < C; c++) {
                        float g = pooled[c];
                        ba[c] += g;
                        bab[c] = fmaf(g, bf16_to_float(br[c]) - centre[c], bab[c]);
                    }
                } else if (b && scale) {
                    const uint16_t *br = b + r * C;
                    #pragma omp simd
                    for (int64_t c = 0; c < C; c++) {
                        float xb = bf16_to_float(br[c]);
                        float g = relu_passes(xb, scale[c], offset[c]) ? bf16_to_float(ar[c]) : 0.0f;
                        ba[c] += g;
                        bab[c] = fmaf(g, xb - centre[c], bab[c]);
                    }
                } else if (b) {
                    const uint16_t *br = b + r * C;
                    #pragma omp simd
                    for (int64_t c = 0; c < C; c++) {
                        float g = bf16_to_float(ar[c]);
                        ba[c] += g;
                        bab[c] = fmaf(g, bf16_to_float(br[c]) - centre[c], bab[c]);
                    }
                } else {
                    #pragma omp simd
                    for (int64_t c = 0; c < C; c++) {
                        float d = bf16_to_float(ar[c]) - centre[c];
                        ba[c] += d;
                        bab[c] = fmaf(d, d, bab[c]);
                    }
                }
            }
            for (int64_t c = 0; c < C; c++) { pa[c] += ba[c]; pab[c] += bab[c]; }
        }
        free(ba);
        free(bab);
        free(pooled);
    }
    if (failed) {
        free(partial);
        return -1;
    }
    for (int64_t c = 0; c < C; c++) { sum_a[c] = 0.0; sum_ab[c] = 0.0; }
    for (int t = 0; t < team; t++)
        for (int64_t c = 0; c < C; c++) {
            sum_a[c] += partial[(size_t)t * C * 2 + c];
            sum_ab[c] += partial[(size_t)t * C * 2 + C + c];
        }
    free(partial);
    return 0;
}

/* The per-channel scale and offset of BatchNorm's output, weight * invstd and bias - mean * scale: forward and
 * backward compute them the same way, so the backward's ReLU mask is the forward's to the bit. */
static inline void affine_of(const float *weight, const float *bias, const float *mean, const float *invstd,
                             int64_t c, float *scale, float *offset) {
    *scale = (weight ? weight[c] : 1.0f) * invstd[c];
    *offset = fmaf(-mean[c], *scale, bias ? bias[c] : 0.0f);
}

/* BatchNorm's batch statistics of x, (rows, C): mean, invstd = 1 / sqrt(var + eps) and the unbiased
 * variance (for the running statistics).  Returns 0, or -1 when out of memory. */
int batch_statistics(const uint16_t *x, int64_t rows, int64_t C, double eps, float *mean, float *invstd,
                     float *var_unbiased, int threads) {
    float *centre = calloc((size_t)C, sizeof(float));
    double *sum = malloc((size_t)C * sizeof(double)), *sumsq = malloc((size_t)C * sizeof(double));
    int failed = !centre || !sum || !sumsq;
    if (!failed) {
        for (int64_t c = 0; c < C; c++) centre[c] = bf16_to_float(x[c]);
        failed = channel_sums(x, NULL, NULL, centre, NULL, NULL, rows, C, sum, sumsq, threads);
    }
    for (int64_t c = 0; !failed && c < C; c++) {
        double m = sum[c] / (double)rows;
        double var = sumsq[c] / (double)rows - m * m;
        if (var < 0) var = 0;
        mean[c] = (float)(m + centre[c]);
        invstd[c] = (float)(1.0 / sqrt(var + eps));
        var_unbiased[c] = (float)(rows > 1 ? var * (double)rows / (double)(rows - 1) : var);
    }
    free(centre); free(sum); free(sumsq);
    return failed ? -1 : 0;
}

/* BatchNorm forward in training mode: batch_statistics, then y = x * scale + offset per channel (relu != 0:
 * then max(y, 0)).  weight and bias may be NULL (1 and 0).  Returns 0, or -1 when out of memory. */
int batch_norm_forward(const uint16_t *x, int64_t rows, int64_t C, const float *weight, const float *bias,
                       double eps, int relu, uint16_t *y, float *mean, float *invstd, float *var_unbiased,
                       int threads) {
    float *scale = malloc((size_t)C * sizeof(float)), *offset = malloc((size_t)C * sizeof(float));
    if (!scale || !offset || batch_statistics(x, rows, C, eps, mean, invstd, var_unbiased, threads)) {
        free(scale); free(offset);
        return -1;
    }
    for (int64_t c = 0; c < C; c++) affine_of(weight, bias, mean, invstd, c, &scale[c], &offset[c]);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * C;
        uint16_t *yr = y + r * C;
        if (relu) {
            #pragma omp simd
            for (int64_t c = 0; c < C; c++) {
                float z = fmaf(bf16_to_float(xr[c]), scale[c], offset[c]);
                yr[c] = float_to_bf16(z <= 0.0f ? 0.0f : z);  /* as torch's relu: a NaN stays */
            }
        } else {
            #pragma omp simd
            for (int64_t c = 0; c < C; c++) yr[c] = float_to_bf16(fmaf(bf16_to_float(xr[c]), scale[c], offset[c]));
        }
    }
    free(scale); free(offset);
    return 0;
}

/* BatchNorm backward in training mode, from the forward's mean and invstd (relu != 0: of the forward with
 * relu, whose mask is recomputed from x, weight and bias; pool != NULL: dy is a tiling max-pool's output
 * gradient, see Pooled).  Writes the weight's and bias's gradients (float32, per channel) and, when dx is not
 * NULL, the input's, with g the gradient reaching BatchNorm's output:
 * dx = weight * invstd * (g - mean(g) - xhat * mean(g * xhat)).  Returns 0, or -1 when out of memory. */
static int backward(const uint16_t *dy, const Pooled *pool, const uint16_t *x, int64_t rows, int64_t C,
                    const float *weight, const float *bias, const float *mean, const float *invstd, int relu,
                    uint16_t *dx, float *dweight, float *dbias, int threads) {
    double *sum_dy = malloc((size_t)C * sizeof(double)), *sum_dyx = malloc((size_t)C * sizeof(double));
    float *k_dy = malloc((size_t)C * sizeof(float)), *k_x = malloc((size_t)C * sizeof(float));
    float *k_1 = malloc((size_t)C * sizeof(float)), *scale = malloc((size_t)C * sizeof(float));
    float *offset = malloc((size_t)C * sizeof(float));
    int failed = !sum_dy || !sum_dyx || !k_dy || !k_x || !k_1 || !scale || !offset;
    for (int64_t c = 0; !failed && c < C; c++) affine_of(weight, bias, mean, invstd, c, &scale[c], &offset[c]);
    if (!failed)
        failed = channel_sums(dy, pool, x, mean, relu ? scale : NULL, offset, rows, C, sum_dy, sum_dyx, threads);
    for (int64_t c = 0; !failed && c < C; c++) {
        double w = weight ? weight[c] : 1.0, s = invstd[c];
        dweight[c] = (float)(sum_dyx[c] * s);
        dbias[c] = (float)sum_dy[c];
        double mean_dy = sum_dy[c] / (double)rows, mean_dyx = sum_dyx[c] / (double)rows;
        k_dy[c] = (float)(w * s);
        k_x[c] = (float)(-w * s * s * s * mean_dyx);
        k_1[c] = (float)(-w * s * mean_dy + w * s * s * s * mean_dyx * mean[c]);
    }
    if (!failed && dx) {
        #pragma omp parallel num_threads(threads)
        {
            float *pooled = pool ? malloc((size_t)C * sizeof(float)) : NULL;
            if (pool && !pooled) {
                #pragma omp atomic write
                failed = 1;
            }
            #pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; r++) {
                const uint16_t *gr = pool ? NULL : dy + r * C, *xr = x + r * C;
                uint16_t *o = dx + r * C;
                if (pool) {
                    if (!pooled) continue;
                    pooled_gradient_row(dy, pool, r, C, pooled);
                    #pragma omp simd
                    for (int64_t c = 0; c < C; c++)
                        o[c] = float_to_bf16(fmaf(pooled[c], k_dy[c], fmaf(bf16_to_float(xr[c]), k_x[c], k_1[c])));
                } else if (relu) {
                    #pragma omp simd
                    for (int64_t c = 0; c < C; c++) {
                        float xv = bf16_to_float(xr[c]);
                        float g = relu_passes(xv, scale[c], offset[c]) ? bf16_to_float(gr[c]) : 0.0f;
                        o[c] = float_to_bf16(fmaf(g, k_dy[c], fmaf(xv, k_x[c], k_1[c])));
                    }
                } else {
                    #pragma omp simd
                    for (int64_t c = 0; c < C; c++)
                        o[c] = float_to_bf16(fmaf(bf16_to_float(gr[c]), k_dy[c],
                                                  fmaf(bf16_to_float(xr[c]), k_x[c], k_1[c])));
                }
            }
            free(pooled);
        }
    }
    free(sum_dy); free(sum_dyx); free(k_dy); free(k_x); free(k_1); free(scale); free(offset);
    return failed ? -1 : 0;
}

int batch_norm_backward(const uint16_t *dy, const uint16_t *x, int64_t rows, int64_t C, const float *weight,
                        const float *bias, const float *mean, const float *invstd, int relu, uint16_t *dx,
                        float *dweight, float *dbias, int threads) {
    return backward(dy, NULL, x, rows, C, weight, bias, mean, invstd, relu, dx, dweight, dbias, threads);
}

/* The backward of batch_norm_max_pool_forward: dy is the pool's output gradient (N, OH, OW, C), where[] the
 * forward's; x the BatchNorm's input.  The same numbers as max_pool_backward then batch_norm_backward, without
 * writing or reading BatchNorm's output gradient.  Returns 0, or -1 when out of memory. */
int batch_norm_max_pool_backward(const uint16_t *dy, const uint8_t *where, const uint16_t *x, int64_t N,
                                 int64_t H, int64_t W, int64_t C, int kh, int kw, const float *weight,
                                 const float *bias, const float *mean, const float *invstd, uint16_t *dx,
                                 float *dweight, float *dbias, int threads) {
    Pooled pool = {where, H, W, H / kh, W / kw, kh, kw};
    return backward(dy, &pool, x, N * H * W, C, weight, bias, mean, invstd, 0, dx, dweight, dbias, threads);
}

/* Max-pooling of a channels_last (N, C, H, W) tensor, i.e. an (N, H, W, C) array, by windows of kh x kw at
 * stride sh x sw without padding (the network pads separately), into y, an (N, OH, OW, C) array.  As torch:
 * the first maximum of a window in row-major order wins, and a NaN wins (the last NaN, if several).
 * relu != 0: y = max(window) where it is positive, else 0 (relu(maxpool(x)), which equals
 * maxpool(relu(x))).  where[] records, per output element, the winner's position in its window
 * (0 .. kh * kw - 1, at most 127) and, in bit 7, whether the gradient passes (always without relu; where
 * the output is positive with it): one byte where torch keeps an int64 index, and no separate ReLU pass
 * forward or backward. */
static int pool_forward(const uint16_t *x, const float *scale, const float *offset, int64_t N, int64_t H,
                        int64_t W, int64_t C, int kh, int kw, int sh, int sw, int64_t OH, int64_t OW, int relu,
                        uint16_t *y, uint8_t *where, int threads) {
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        uint16_t *normed = scale ? malloc((size_t)C * sizeof(uint16_t)) : NULL;  /* a row of BatchNorm's output */
        if (scale && !normed) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t row = 0; row < N * OH; row++) {
            if (scale && !normed) continue;
            int64_t n = row / OH, oh = row % OH;
            for (int64_t ow = 0; ow < OW; ow++) {
                uint16_t *yr = y + ((row * OW) + ow) * C;
                uint8_t *wr = where + ((row * OW) + ow) * C;
                for (int64_t c = 0; c < C; c++) { yr[c] = 0xff80u; wr[c] = 0; }  /* -inf, the first position */
                for (int i = 0; i < kh; i++)
                    for (int j = 0; j < kw; j++) {
                        const uint16_t *xr = x + ((n * H + oh * sh + i) * W + ow * sw + j) * C;
                        if (scale) {  /* exactly what batch_norm_forward (without relu) would have written */
                            #pragma omp simd
                            for (int64_t c = 0; c < C; c++)
                                normed[c] = float_to_bf16(fmaf(bf16_to_float(xr[c]), scale[c], offset[c]));
                            xr = normed;
                        }
                        uint8_t pos = (uint8_t)(i * kw + j);
                        #pragma omp simd
                        for (int64_t c = 0; c < C; c++) {
                            float v = bf16_to_float(xr[c]), best = bf16_to_float(yr[c]);
                            int take = (v > best) | (v != v);  /* as torch: a later NaN wins too */
                            yr[c] = take ? xr[c] : yr[c];
                            wr[c] = take ? pos : wr[c];
                        }
                    }
                #pragma omp simd
                for (int64_t c = 0; c < C; c++) {
                    float best = bf16_to_float(yr[c]);
                    int passes = !relu || !(best <= 0.0f);  /* as torch's threshold_backward: a NaN passes */
                    yr[c] = (relu && !(best > 0.0f) && best == best) ? 0 : yr[c];
                    wr[c] = (uint8_t)(wr[c] | (passes ? 0x80u : 0u));
                }
            }
        }
        free(normed);
    }
    return failed ? -1 : 0;
}

int max_pool_forward(const uint16_t *x, int64_t N, int64_t H, int64_t W, int64_t C, int kh, int kw, int sh,
                     int sw, int64_t OH, int64_t OW, int relu, uint16_t *y, uint8_t *where, int threads) {
    return pool_forward(x, NULL, NULL, N, H, W, C, kh, kw, sh, sw, OH, OW, relu, y, where, threads);
}

/* BatchNorm (training mode, from batch_statistics' mean and invstd) and then a max-pool that tiles its output
 * (windows of kh x kw at the same stride, H and W multiples of them), in one pass: the same y and where[] as
 * batch_norm_forward then max_pool_forward, without writing or reading BatchNorm's output.  Returns 0, or -1
 * when out of memory. */
int batch_norm_max_pool_forward(const uint16_t *x, int64_t N, int64_t H, int64_t W, int64_t C, int kh, int kw,
                                const float *weight, const float *bias, const float *mean, const float *invstd,
                                int relu, uint16_t *y, uint8_t *where, int threads) {
    float *scale = malloc((size_t)C * sizeof(float)), *offset = malloc((size_t)C * sizeof(float));
    int failed = !scale || !offset;
    for (int64_t c = 0; !failed && c < C; c++) affine_of(weight, bias, mean, invstd, c, &scale[c], &offset[c]);
    if (!failed)
        failed = pool_forward(x, scale, offset, N, H, W, C, kh, kw, kh, kw, H / kh, W / kw, relu, y, where, threads);
    free(scale); free(offset);
    return failed ? -1 : 0;
}

/* The gradient of max_pool_forward: each output's gradient goes to its window's winner, where bit 7 of
 * where[] lets it pass.  Overlapping windows add up in float32, rounded to bf16 once.  Returns 0, or -1 when
 * out of memory. */
int max_pool_backward(const uint16_t *dy, const uint8_t *where, int64_t N, int64_t H, int64_t W, int64_t C,
                      int kh, int kw, int sh, int sw, int64_t OH, int64_t OW, uint16_t *dx, int threads) {
    int tiles = kh == sh && kw == sw && OH * sh == H && OW * sw == W;  /* every input in exactly one window */
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        float *acc = tiles ? NULL : malloc((size_t)(H * W * C) * sizeof(float));
        if (!tiles && !acc) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            if (!tiles && !acc) continue;
            if (tiles) {
                for (int64_t oh = 0; oh < OH; oh++)
                    for (int64_t ow = 0; ow < OW; ow++) {
                        const uint16_t *gr = dy + ((n * OH + oh) * OW + ow) * C;
                        const uint8_t *wr = where + ((n * OH + oh) * OW + ow) * C;
                        for (int i = 0; i < kh; i++)
                            for (int j = 0; j < kw; j++) {
                                uint16_t *o = dx + ((n * H + oh * sh + i) * W + ow * sw + j) * C;
                                uint8_t mine = (uint8_t)(0x80 | (i * kw + j));
                                #pragma omp simd
                                for (int64_t c = 0; c < C; c++) o[c] = (uint16_t)(gr[c] & -(uint16_t)(wr[c] == mine));
                            }
                    }
                continue;
            }
            for (int64_t k = 0; k < H * W * C; k++) acc[k] = 0.0f;
            for (int64_t oh = 0; oh < OH; oh++)
                for (int64_t ow = 0; ow < OW; ow++) {
                    const uint16_t *gr = dy + ((n * OH + oh) * OW + ow) * C;
                    const uint8_t *wr = where + ((n * OH + oh) * OW + ow) * C;
                    for (int64_t c = 0; c < C; c++) {
                        if (!(wr[c] & 0x80)) continue;
                        int pos = wr[c] & 0x7f, i = pos / kw, j = pos % kw;
                        acc[((oh * sh + i) * W + ow * sw + j) * C + c] += bf16_to_float(gr[c]);
                    }
                }
            uint16_t *o = dx + n * H * W * C;
            #pragma omp simd
            for (int64_t k = 0; k < H * W * C; k++) o[k] = float_to_bf16(acc[k]);
        }
        free(acc);
    }
    return failed ? -1 : 0;
}
