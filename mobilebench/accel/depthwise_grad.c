/* Weight gradient of a depthwise convolution, channels_last fp32.
 *
 * acc[(ky * K + kx) * C + c] += sum over images n in [n0, n1) and output positions (ho, wo) of
 *     grad[n, ho, wo, c] * x[n, ho * S + ky - P, wo * S + kx - P, c]
 * with x zero outside [0, H) x [0, W). Tensors are dense NHWC, so the inner loop runs over
 * contiguous channels and vectorizes; each caller thread owns its own acc.
 *
 * Why not oneDNN: its depthwise backward-weights runs 5x5 kernels at 7-11 GMAC/s on CIFAR
 * shapes; this loop reaches 2-4x that (see mobilebench/accel/native.py).
 */
#include <stdint.h>

void depthwise_weight_grad(const float *restrict grad, const float *restrict x, float *restrict acc,
                           int64_t n0, int64_t n1, int64_t C, int64_t H, int64_t W, int64_t Ho,
                           int64_t Wo, int64_t K, int64_t S, int64_t P) {
    for (int64_t n = n0; n < n1; n++)
        for (int64_t ho = 0; ho < Ho; ho++)
            for (int64_t ky = 0; ky < K; ky++) {
                const int64_t hi = ho * S + ky - P;
                if (hi < 0 || hi >= H) continue;
                for (int64_t wo = 0; wo < Wo; wo++) {
                    const float *g = grad + ((n * Ho + ho) * Wo + wo) * C;
                    for (int64_t kx = 0; kx < K; kx++) {
                        const int64_t wi = wo * S + kx - P;
                        if (wi < 0 || wi >= W) continue;
                        const float *xs = x + ((n * H + hi) * W + wi) * C;
                        float *a = acc + (ky * K + kx) * C;
                        for (int64_t c = 0; c < C; c++) a[c] += g[c] * xs[c];
                    }
                }
            }
}
