/* The fused CPU 8-bit step timed alone, without Python around it, beside the memory
 * traffic it cannot avoid. Built and run by `python examples/benchmark.py --kernel-only`,
 * which compiles it with the kernel's own flags, the -D switches of the configuration
 * core.AdamW(state_precision="8bit", fused=True) selects, and -DKERNEL_SOURCE naming
 * core/backends/cpu_kernel.c (included below, so the step is the very code users run).
 *
 * Usage: kernel_timing WORDS_FILE COUNT NUMEL REPEATS INNER
 *   WORDS_FILE: cpu_kernel.map_words() as raw little-endian uint32 (both code maps).
 * Prints two lines, each the best of REPEATS timings of INNER calls in ns per element
 * (this thread's CPU time, so other processes' time slices do not count), then a check:
 *   step  <ns>   adamkit_step_q8 over COUNT fp32 tensors of NUMEL elements, one thread
 *   floor <ns>   the same bytes moved with almost no arithmetic: read grad, θ and both
 *                moments' codes, write θ and the codes (16 bytes per element)
 *   linear <ns>  (AVX-512 builds only) the same AdamW update over the cheapest 8-bit
 *                format there is: linear codes (m signed, v unsigned) times each block's
 *                absmax, decoded by one conversion and one multiply, encoded by one
 *                multiply and one saturating conversion, FMAs allowed. No code map can
 *                cost less, so where this line is above a target, no map meets it.
 *   idle  <n>    blocks whose m or v scale is not positive after the last step: such a
 *                block skips encoding, so a timing with any is not the full work */
#include KERNEL_SOURCE

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double thread_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void *zeroed(size_t bytes) {
    void *p = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!p) {
        perror("aligned_alloc");
        exit(2);
    }
    memset(p, 0, bytes);
    return p;
}

/* The floor: what any step that keeps 8-bit m and v must move, with one add per byte. */
static void move_bytes(int64_t count, int64_t numel, float **params, float **grads,
                       uint8_t **m_codes, uint8_t **v_codes) {
    for (int64_t k = 0; k < count; k++) {
        float *restrict param = params[k];
        const float *restrict grad = grads[k];
        uint8_t *restrict m = m_codes[k], *restrict v = v_codes[k];
        for (int64_t i = 0; i < numel; i++) {
            param[i] += grad[i];
            m[i] += 1;
            v[i] += 3;
        }
    }
}

#if defined(__AVX512F__)
#include <immintrin.h>
#define HAS_LINEAR_STEP 1
/* The lower bound for every code map: one pass per block that decodes, updates (AdamW, the
 * coefficients of main's), stages m and v in L1 with their largest magnitudes, then encodes. */
static void linear_step(int64_t count, int64_t numel, float **params, float **grads,
                        uint8_t **m_codes, float **m_absmax, uint8_t **v_codes, float **v_absmax) {
    __attribute__((aligned(64))) float staged_m[CODE_BLOCK], staged_v[CODE_BLOCK];
    const __m512 beta1 = _mm512_set1_ps(0.9f), one_minus_beta1 = _mm512_set1_ps(0.1f),
                 beta2 = _mm512_set1_ps(0.999f), one_minus_beta2 = _mm512_set1_ps(0.001f),
                 decay = _mm512_set1_ps(1.0f - 1e-5f), step_size = _mm512_set1_ps(1.5e-3f),
                 correction = _mm512_set1_ps(10.0f), eps = _mm512_set1_ps(1e-8f);
    const __m512 magnitude = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    for (int64_t k = 0; k < count; k++) {
        float *restrict param = params[k];
        const float *restrict grad = grads[k];
        int8_t *restrict m = (int8_t *)m_codes[k];
        uint8_t *restrict v = v_codes[k];
        for (int64_t block = 0; block < numel / CODE_BLOCK; block++) {
            const int64_t start = block * CODE_BLOCK;
            const __m512 m_unit = _mm512_set1_ps(m_absmax[k][block] / 127),
                         v_unit = _mm512_set1_ps(v_absmax[k][block] / 255);
            __m512 m_top = _mm512_setzero_ps(), v_top = _mm512_setzero_ps();
            for (int j = 0; j < CODE_BLOCK; j += 16) {
                const int64_t at = start + j;
                const __m512 g = _mm512_loadu_ps(grad + at);
                __m512 mj = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(m + at))));
                __m512 vj = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(v + at))));
                mj = _mm512_fmadd_ps(_mm512_mul_ps(beta1, m_unit), mj, _mm512_mul_ps(one_minus_beta1, g));
                vj = _mm512_fmadd_ps(_mm512_mul_ps(beta2, v_unit), vj,
                                     _mm512_mul_ps(one_minus_beta2, _mm512_mul_ps(g, g)));
                const __m512 denominator = _mm512_fmadd_ps(_mm512_sqrt_ps(vj), correction, eps);
                const __m512 theta = _mm512_mul_ps(_mm512_loadu_ps(param + at), decay);
                _mm512_storeu_ps(param + at,
                                 _mm512_fnmadd_ps(step_size, _mm512_div_ps(mj, denominator), theta));
                _mm512_store_ps(staged_m + j, mj);
                _mm512_store_ps(staged_v + j, vj);
                m_top = _mm512_max_ps(m_top, _mm512_and_ps(mj, magnitude));
                v_top = _mm512_max_ps(v_top, vj);
            }
            const float m_largest = _mm512_reduce_max_ps(m_top), v_largest = _mm512_reduce_max_ps(v_top);
            m_absmax[k][block] = m_largest;
            v_absmax[k][block] = v_largest;
            const __m512 m_inverse = _mm512_set1_ps(m_largest > 0 ? 127 / m_largest : 0),
                         v_inverse = _mm512_set1_ps(v_largest > 0 ? 255 / v_largest : 0);
            for (int j = 0; j < CODE_BLOCK; j += 16) {
                const __m512 mq = _mm512_mul_ps(_mm512_load_ps(staged_m + j), m_inverse);
                const __m512 vq = _mm512_mul_ps(_mm512_load_ps(staged_v + j), v_inverse);
                _mm_storeu_si128((__m128i *)(m + start + j), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(mq)));
                _mm_storeu_si128((__m128i *)(v + start + j), _mm512_cvtusepi32_epi8(_mm512_cvtps_epi32(vq)));
            }
        }
    }
}
#else
#define HAS_LINEAR_STEP 0
#endif

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s WORDS_FILE COUNT NUMEL REPEATS INNER\n", argv[0]);
        return 2;
    }
    const int64_t count = atoll(argv[2]), numel = atoll(argv[3]);
    const int repeats = atoi(argv[4]), inner = atoi(argv[5]);
    if (count < 1 || numel < CODE_BLOCK || numel % CODE_BLOCK || repeats < 1 || inner < 1) {
        fprintf(stderr, "COUNT, REPEATS and INNER must be positive, NUMEL a multiple of %d\n",
                CODE_BLOCK);
        return 2;
    }
    enum { WORD_COUNT = 2 * MAP_WORDS };
    static uint32_t words[WORD_COUNT];
    FILE *file = fopen(argv[1], "rb");
    if (!file || fread(words, sizeof words[0], WORD_COUNT, file) != WORD_COUNT) {
        fprintf(stderr, "%s: expected %d map words\n", argv[1], WORD_COUNT);
        return 2;
    }
    fclose(file);

    float **params = zeroed(count * sizeof *params), **grads = zeroed(count * sizeof *grads);
    uint8_t **m_codes = zeroed(count * sizeof *m_codes), **v_codes = zeroed(count * sizeof *v_codes);
    float **m_absmax = zeroed(count * sizeof *m_absmax), **v_absmax = zeroed(count * sizeof *v_absmax);
    /* The linear step's own θ and state, so neither step reads what the other wrote. */
    float **linear_params = zeroed(count * sizeof *linear_params);
    uint8_t **linear_m = zeroed(count * sizeof *linear_m), **linear_v = zeroed(count * sizeof *linear_v);
    float **linear_m_absmax = zeroed(count * sizeof *linear_m_absmax),
          **linear_v_absmax = zeroed(count * sizeof *linear_v_absmax);
    int64_t *sizes = zeroed(count * sizeof *sizes);
    /* each tensor's key for the stochastic rounding of its m and v, as every step passes */
    uint32_t *state_keys = zeroed(count * sizeof *state_keys);
    uint32_t seed = 1;
    for (int64_t k = 0; k < count; k++) {
        sizes[k] = numel;
        state_keys[k] = (uint32_t)k * 0x9e3779b1u + 1u;
        params[k] = zeroed(numel * sizeof(float));
        grads[k] = zeroed(numel * sizeof(float));
        for (int64_t i = 0; i < numel; i++) { /* θ in [-0.5, 0.5) */
            seed = seed * 1664525u + 1013904223u;
            params[k][i] = (float)(seed >> 8) * 0x1p-24f - 0.5f;
        }
        for (int64_t i = 0; i < numel; i++) grads[k][i] = 0.01f * params[k][numel - 1 - i];
        m_codes[k] = zeroed(numel);
        v_codes[k] = zeroed(numel);
        m_absmax[k] = zeroed(numel / CODE_BLOCK * sizeof(float));
        v_absmax[k] = zeroed(numel / CODE_BLOCK * sizeof(float));
        if (HAS_LINEAR_STEP) {
            linear_params[k] = zeroed(numel * sizeof(float));
            memcpy(linear_params[k], params[k], numel * sizeof(float));
            linear_m[k] = zeroed(numel);
            linear_v[k] = zeroed(numel);
            linear_m_absmax[k] = zeroed(numel / CODE_BLOCK * sizeof(float));
            linear_v_absmax[k] = zeroed(numel / CODE_BLOCK * sizeof(float));
        }
    }
    /* AdamW's coefficients (cpu_kernel.c's make_scalars): lr 1e-3, betas (0.9, 0.999),
     * eps 1e-8, weight decay 1e-2, bias corrections of step 10. */
    const double coefficients[10] = {0.1, 0.999, 0.001, 1e-8, 0.0, 1.0 - 1e-5,
                                     1e-3 / (1.0 - 0.348678), 0.0, 0.0998, 0.0};
    double best_step = 1e30, best_floor = 1e30, best_linear = 1e30;
    for (int r = 0; r < repeats + 2; r++) { /* two untimed rounds fill the codes and caches */
        double start = thread_seconds();
        for (int z = 0; z < inner; z++)
            adamkit_step_q8(count, sizes, sizes, (void *const *)params, (void *const *)grads, 0,
                            0, state_keys, (void *const *)m_codes, (void *const *)m_absmax,
                            (void *const *)v_codes, (void *const *)v_absmax, 0, 0, coefficients,
                            words, 1, 0);
        double step = thread_seconds() - start;
        start = thread_seconds();
        for (int z = 0; z < inner; z++) move_bytes(count, numel, params, grads, m_codes, v_codes);
        double floor = thread_seconds() - start;
        double linear = 0;
#if HAS_LINEAR_STEP
        start = thread_seconds();
        for (int z = 0; z < inner; z++)
            linear_step(count, numel, linear_params, grads, linear_m, linear_m_absmax, linear_v,
                        linear_v_absmax);
        linear = thread_seconds() - start;
#endif
        if (r >= 2) {
            best_step = step < best_step ? step : best_step;
            best_floor = floor < best_floor ? floor : best_floor;
            best_linear = linear < best_linear ? linear : best_linear;
        }
    }
    long idle = 0;
    for (int64_t k = 0; k < count; k++)
        for (int64_t b = 0; b < numel / CODE_BLOCK; b++)
            idle += !(m_absmax[k][b] > 0) || !(v_absmax[k][b] > 0) ||
                    (HAS_LINEAR_STEP && (!(linear_m_absmax[k][b] > 0) || !(linear_v_absmax[k][b] > 0)));
    const double elements = (double)count * (double)numel * inner;
    printf("step %.4f\nfloor %.4f\n", 1e9 * best_step / elements, 1e9 * best_floor / elements);
    if (HAS_LINEAR_STEP) printf("linear %.4f\n", 1e9 * best_linear / elements);
    printf("idle %ld\n", idle);
    return 0;
}
