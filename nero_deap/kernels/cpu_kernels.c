/* CPU kernels for training in bf16 channels_last, loaded by nero_deap/native.py through ctypes.
 *
 * A channels_last (N, C, H, W) tensor is, in memory, a (rows = N * H * W, C) matrix: each row holds the C
 * channels of one pixel.  Every loop here walks rows and vectorises over channels.  Arithmetic is float32
 * per element; per-channel sums go through float32 over blocks of BLOCK rows and double across blocks, and
 * the variance is taken around a per-channel shift (the first row) so that E[x^2] - E[x]^2 cannot cancel.
 * Threads split the rows into `threads` fixed ranges and their partial sums are added in thread order, so
 * results depend on the thread count only, never on scheduling.  No Python API: plain C over raw pointers.
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

/* Per-channel sums over rows of a and of a * (b - centre) (b = NULL: of a and of (a - centre)^2, where
 * centre = shift), into sum_a and sum_ab: float32 within blocks of BLOCK rows, double across them.  With
 * scale (and offset), a counts only where relu_passes(b, scale, offset).  Returns 0, or -1 when out of
 * memory. */
static int channel_sums(const uint16_t *a, const uint16_t *b, const float *centre, const float *scale,
                        const float *offset, int64_t rows, int64_t C, double *sum_a, double *sum_ab, int threads) {
    double *partial = calloc((size_t)threads * (size_t)C * 2, sizeof(double));
    int failed = !partial;
    #pragma omp parallel num_threads(threads) if (!failed)
    {
        int t = omp_get_thread_num();
        int64_t lo = rows * t / threads, hi = rows * (t + 1) / threads;
        double *pa = partial + (size_t)t * C * 2, *pab = pa + C;
        /* each thread's own allocations: one block for all threads' float sums ran 1.3-2.7x slower */
        float *ba = malloc((size_t)C * sizeof(float)), *bab = malloc((size_t)C * sizeof(float));
        if (!ba || !bab) {
            #pragma omp atomic write
            failed = 1;
            hi = lo;
        }
        for (int64_t r0 = lo; r0 < hi; r0 += BLOCK) {
            int64_t r1 = r0 + BLOCK < hi ? r0 + BLOCK : hi;
            for (int64_t c = 0; c < C; c++) { ba[c] = 0.0f; bab[c] = 0.0f; }
            for (int64_t r = r0; r < r1; r++) {
                const uint16_t *ar = a + r * C;
                if (b && scale) {
                    const uint16_t *br = b + r * C;
                    #pragma omp simd
                    for (int64_t c = 0; c < C; c++) {
                        float xb = bf16_to_float(br[c]);
                        float g = relu_passes(xb, scale[c], offset[c]) ? bf16_to_float(ar[c]) : 0.0f;
                        ba[c] += g;
                        bab[c] += g * (xb - centre[c]);
                    }
                } else if (b) {
                    const uint16_t *br = b + r * C;
                    #pragma omp simd
                    for (int64_t c = 0; c < C; c++) {
                        float g = bf16_to_float(ar[c]);
                        ba[c] += g;
                        bab[c] += g * (bf16_to_float(br[c]) - centre[c]);
                    }
                } else {
                    #pragma omp simd
                    for (int64_t c = 0; c < C; c++) {
                        float d = bf16_to_float(ar[c]) - centre[c];
                        ba[c] += d;
                        bab[c] += d * d;
                    }
                }
            }
            for (int64_t c = 0; c < C; c++) { pa[c] += ba[c]; pab[c] += bab[c]; }
        }
        free(ba);
        free(bab);
    }
    if (failed) {
        free(partial);
        return -1;
    }
    for (int64_t c = 0; c < C; c++) { sum_a[c] = 0.0; sum_ab[c] = 0.0; }
    for (int t = 0; t < threads; t++)
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
    *offset = (bias ? bias[c] : 0.0f) - mean[c] * *scale;
}

/* BatchNorm forward in training mode: batch statistics, then y = x * scale + shift per channel (relu != 0:
 * then max(y, 0)).  weight and bias may be NULL (1 and 0).  Writes mean, invstd = 1 / sqrt(var + eps) and
 * the unbiased variance (for the running statistics).  Returns 0, or -1 when out of memory. */
int batch_norm_forward(const uint16_t *x, int64_t rows, int64_t C, const float *weight, const float *bias,
                       double eps, int relu, uint16_t *y, float *mean, float *invstd, float *var_unbiased,
                       int threads) {
    float *centre = calloc((size_t)C, sizeof(float)), *scale = malloc((size_t)C * sizeof(float));
    float *offset = malloc((size_t)C * sizeof(float));
    double *sum = malloc((size_t)C * sizeof(double)), *sumsq = malloc((size_t)C * sizeof(double));
    if (!centre || !scale || !offset || !sum || !sumsq) {
        free(centre); free(scale); free(offset); free(sum); free(sumsq);
        return -1;
    }
    for (int64_t c = 0; c < C; c++) centre[c] = bf16_to_float(x[c]);
    if (channel_sums(x, NULL, centre, NULL, NULL, rows, C, sum, sumsq, threads)) {
        free(centre); free(scale); free(offset); free(sum); free(sumsq);
        return -1;
    }
    for (int64_t c = 0; c < C; c++) {
        double m = sum[c] / (double)rows;
        double var = sumsq[c] / (double)rows - m * m;
        if (var < 0) var = 0;
        mean[c] = (float)(m + centre[c]);
        invstd[c] = (float)(1.0 / sqrt(var + eps));
        var_unbiased[c] = (float)(rows > 1 ? var * (double)rows / (double)(rows - 1) : var);
        affine_of(weight, bias, mean, invstd, c, &scale[c], &offset[c]);
    }
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
    free(centre); free(scale); free(offset); free(sum); free(sumsq);
    return 0;
}

/* BatchNorm backward in training mode, from the forward's mean and invstd (relu != 0: of the forward with
 * relu, whose mask is recomputed from x, weight and bias).  Writes the weight's and bias's gradients (float32,
 * per channel) and, when dx is not NULL, the input's, with g the gradient through the ReLU:
 * dx = weight * invstd * (g - mean(g) - xhat * mean(g * xhat)).  Returns 0, or -1 when out of memory. */
int batch_norm_backward(const uint16_t *dy, const uint16_t *x, int64_t rows, int64_t C, const float *weight,
                        const float *bias, const float *mean, const float *invstd, int relu, uint16_t *dx,
                        float *dweight, float *dbias, int threads) {
    double *sum_dy = malloc((size_t)C * sizeof(double)), *sum_dyx = malloc((size_t)C * sizeof(double));
    float *k_dy = malloc((size_t)C * sizeof(float)), *k_x = malloc((size_t)C * sizeof(float));
    float *k_1 = malloc((size_t)C * sizeof(float)), *scale = malloc((size_t)C * sizeof(float));
    float *offset = malloc((size_t)C * sizeof(float));
    if (!sum_dy || !sum_dyx || !k_dy || !k_x || !k_1 || !scale || !offset) {
        free(sum_dy); free(sum_dyx); free(k_dy); free(k_x); free(k_1); free(scale); free(offset);
        return -1;
    }
    for (int64_t c = 0; c < C; c++) affine_of(weight, bias, mean, invstd, c, &scale[c], &offset[c]);
    if (channel_sums(dy, x, mean, relu ? scale : NULL, offset, rows, C, sum_dy, sum_dyx, threads)) {
        free(sum_dy); free(sum_dyx); free(k_dy); free(k_x); free(k_1); free(scale); free(offset);
        return -1;
    }
    for (int64_t c = 0; c < C; c++) {
        double w = weight ? weight[c] : 1.0, s = invstd[c];
        dweight[c] = (float)(sum_dyx[c] * s);
        dbias[c] = (float)sum_dy[c];
        double mean_dy = sum_dy[c] / (double)rows, mean_dyx = sum_dyx[c] / (double)rows;
        k_dy[c] = (float)(w * s);
        k_x[c] = (float)(-w * s * s * s * mean_dyx);
        k_1[c] = (float)(-w * s * mean_dy + w * s * s * s * mean_dyx * mean[c]);
    }
    if (dx) {
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const uint16_t *gr = dy + r * C, *xr = x + r * C;
            uint16_t *o = dx + r * C;
            if (relu) {
                #pragma omp simd
                for (int64_t c = 0; c < C; c++) {
                    float xv = bf16_to_float(xr[c]);
                    float g = relu_passes(xv, scale[c], offset[c]) ? bf16_to_float(gr[c]) : 0.0f;
                    o[c] = float_to_bf16(g * k_dy[c] + xv * k_x[c] + k_1[c]);
                }
            } else {
                #pragma omp simd
                for (int64_t c = 0; c < C; c++)
                    o[c] = float_to_bf16(bf16_to_float(gr[c]) * k_dy[c] + bf16_to_float(xr[c]) * k_x[c] + k_1[c]);
            }
        }
    }
    free(sum_dy); free(sum_dyx); free(k_dy); free(k_x); free(k_1); free(scale); free(offset);
    return 0;
}

/* Max-pooling of a channels_last (N, C, H, W) tensor, i.e. an (N, H, W, C) array, by windows of kh x kw at
 * stride sh x sw without padding (the network pads separately), into y, an (N, OH, OW, C) array.  As torch:
 * the first maximum of a window in row-major order wins, and a NaN wins.  relu != 0: y = max(window) where it
 * is positive, else 0 (relu(maxpool(x)), which equals maxpool(relu(x))).  where[] records, per output
 * element, the winner's position in its window (0 .. kh * kw - 1, at most 127) and, in bit 7, whether the
 * gradient passes (always without relu; where the output is positive with it): one byte where torch keeps an
 * int64 index, and no separate ReLU pass forward or backward. */
void max_pool_forward(const uint16_t *x, int64_t N, int64_t H, int64_t W, int64_t C, int kh, int kw, int sh,
                      int sw, int64_t OH, int64_t OW, int relu, uint16_t *y, uint8_t *where, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t row = 0; row < N * OH; row++) {
        int64_t n = row / OH, oh = row % OH;
        for (int64_t ow = 0; ow < OW; ow++) {
            uint16_t *yr = y + ((row * OW) + ow) * C;
            uint8_t *wr = where + ((row * OW) + ow) * C;
            for (int64_t c = 0; c < C; c++) { yr[c] = 0xff80u; wr[c] = 0; }  /* -inf, the first position */
            for (int i = 0; i < kh; i++)
                for (int j = 0; j < kw; j++) {
                    const uint16_t *xr = x + ((n * H + oh * sh + i) * W + ow * sw + j) * C;
                    uint8_t pos = (uint8_t)(i * kw + j);
                    #pragma omp simd
                    for (int64_t c = 0; c < C; c++) {
                        float v = bf16_to_float(xr[c]), best = bf16_to_float(yr[c]);
                        int take = (v > best) | (v != v);
                        take &= best == best;  /* a NaN, once in, stays */
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
