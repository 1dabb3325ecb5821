/* counter-v3 Gaussian directions on CPU, fused: hash, Box–Muller and store, one 512-pair block at a time.
 *
 * Bitwise equal to the torch-op path of hyft/noise.py (checked when the library is loaded): the same
 * SplitMix64 words, the same exact integer → float steps and products, and the same vector math that torch's
 * CPU kernels call for log, sqrt, cos and sin (MKL's, high-accuracy mode, taken from libtorch_cpu). Pair p of
 * a direction goes to element 1024·(p / 512) + p % 512 (r·cos θ) and 512 elements further on (r·sin θ).
 */
#include <stdint.h>

/* MKL vector math (LP64), as torch's ATen calls it: VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE */
void vmsLn(int n, const float *a, float *r, int64_t mode);
void vmsCos(int n, const float *a, float *r, int64_t mode);
void vmsSin(int n, const float *a, float *r, int64_t mode);
void vmsSqrt(int n, const float *a, float *r, int64_t mode); /* not always correctly rounded: torch's sqrt */
#define VML_MODE 0x140102
int MKL_Set_Num_Threads_Local(int n); /* returns the thread's previous setting (0: the global one) */

#define GAMMA 0x9E3779B97F4A7C15ULL
#define M1 0xBF58476D1CE4E5B9ULL
#define M2 0x94D049BB133111EBULL
#define HALF 512

static inline uint64_t mix64(uint64_t x) {
    x = (x ^ (x >> 30)) * M1;
    x = (x ^ (x >> 27)) * M2;
    return x ^ (x >> 31);
}

/* out[0 : 1024·blocks] ← z for the pairs first_pair, first_pair + 1, ... (first_pair a multiple of 512).
 * Blocks are shared over torch's own OpenMP threads (the same libgomp, so no second pool competes); each
 * thread's MKL calls stay on that thread (MKL would otherwise start nested threads once torch.set_num_threads
 * has been called). */
void hyft_gaussian_blocks(float *out, int64_t blocks, uint64_t key, uint64_t first_pair) {
    const float angle = (float)(6.283185307179586 * 0x1p-24); /* 2π·2⁻²⁴ rounded to float, as torch does */
#pragma omp parallel if (blocks >= 64)
    {
        int previous = MKL_Set_Num_Threads_Local(1);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            float u[HALF] __attribute__((aligned(64))), t[HALF] __attribute__((aligned(64))); /* same MKL path */
            float *cosine = out + b * 2 * HALF, *sine = cosine + HALF;
            uint64_t pair = first_pair + (uint64_t)b * HALF;
            for (int j = 0; j < HALF; j++) {
                uint64_t x = mix64(key + (pair + (uint64_t)j) * GAMMA);
                u[j] = (float)(int32_t)(((x >> 40) & 0xFFFFFF) + 1) * 0x1p-24f; /* (0, 1], exact */
                t[j] = (float)(int32_t)(x & 0xFFFFFF) * angle;
            }
            vmsLn(HALF, u, u, VML_MODE);
            for (int j = 0; j < HALF; j++)
                u[j] *= -2.0f;
            vmsSqrt(HALF, u, u, VML_MODE);
            vmsCos(HALF, t, cosine, VML_MODE);
            vmsSin(HALF, t, sine, VML_MODE);
            for (int j = 0; j < HALF; j++) {
                cosine[j] = u[j] * cosine[j];
                sine[j] = u[j] * sine[j];
            }
        }
        MKL_Set_Num_Threads_Local(previous);
    }
}
