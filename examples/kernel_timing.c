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
    int64_t *sizes = zeroed(count * sizeof *sizes);
    uint32_t seed = 1;
    for (int64_t k = 0; k < count; k++) {
        sizes[k] = numel;
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
    }
    /* AdamW's coefficients (cpu_kernel.c's make_scalars): lr 1e-3, betas (0.9, 0.999),
     * eps 1e-8, weight decay 1e-2, bias corrections of step 10. */
    const double coefficients[10] = {0.1, 0.999, 0.001, 1e-8, 0.0, 1.0 - 1e-5,
                                     1e-3 / (1.0 - 0.348678), 0.0, 0.0998, 0.0};
    double best_step = 1e30, best_floor = 1e30;
    for (int r = 0; r < repeats + 2; r++) { /* two untimed rounds fill the codes and caches */
        double start = thread_seconds();
        for (int z = 0; z < inner; z++)
            adamkit_step_q8(count, sizes, sizes, (void *const *)params, (void *const *)grads, 0,
                            0, (void *const *)m_codes, (void *const *)m_absmax,
                            (void *const *)v_codes, (void *const *)v_absmax, 0, 0, coefficients,
                            words, 1, 0);
        double step = thread_seconds() - start;
        start = thread_seconds();
        for (int z = 0; z < inner; z++) move_bytes(count, numel, params, grads, m_codes, v_codes);
        double floor = thread_seconds() - start;
        if (r >= 2) {
            best_step = step < best_step ? step : best_step;
            best_floor = floor < best_floor ? floor : best_floor;
        }
    }
    long idle = 0;
    for (int64_t k = 0; k < count; k++)
        for (int64_t b = 0; b < numel / CODE_BLOCK; b++)
            idle += !(m_absmax[k][b] > 0) || !(v_absmax[k][b] > 0);
    const double elements = (double)count * (double)numel * inner;
    printf("step %.4f\nfloor %.4f\nidle %ld\n", 1e9 * best_step / elements,
           1e9 * best_floor / elements, idle);
    return 0;
}
