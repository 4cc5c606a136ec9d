/*
 * adamkit's fused CPU step: one pass over every element, reading θ, g, m, v (and v_max,
 * the Kahan buffer k) once and writing each once.
 *
 * core/backends/cpu_kernel.py compiles this file once per configuration with -D switches
 * (the C counterpart of Triton's constexpr arguments), so every switch below is a
 * compile-time constant and the compiler drops the branches a configuration does not
 * use. The rules are the ones in core/coefficients.py; the operations are ordered as the
 * loop backend orders them, so fp32 results agree with it to rounding.
 *
 * Switches:
 *   ALGORITHM   1 = Adam family (Adam, AMSGrad, RAdam, NAdam), 2 = ADOPT
 *   DTYPE       1 = float32, 2 = float64, 3 = bfloat16, 4 = float16 (θ, g and state alike)
 *   KAHAN       θ is read as θ + k and k keeps what rounding θ lost
 *   STOCHASTIC  16-bit θ is rounded stochastically, as core/backends/precision.py's
 *               stochastic_round does, bit for bit: each tensor's 32-bit key of this
 *               step (StochasticRounding.key(), computed on the host) comes in `keys`,
 *               and element i's random bits are mix32(i·0x9E3779B1 + key), i its offset
 *               within the tensor (exclusive with KAHAN; bfloat16 and float16 only)
 *   L2          g ← g + l2·θ before the moments, rounded once (a fused multiply-add,
 *               as torch's add(alpha=) rounds it: where g nearly cancels l2·θ, the step
 *               follows the few bits left, and two roundings took other ones)
 *   DECAY       θ ← param_decay·θ before the update
 *   UPDATE      the parameter is updated at all (lr ≠ 0)
 *   AMSGRAD, ADAPTIVE, GRAD_TERM (NAdam's g/d term)     Adam family only
 *   INIT, CLIP                                           ADOPT only
 *   Q8          some moments are 8-bit (core.quantization): codes plus a scale per
 *               block, decoded, stepped by the same update() and encoded again in one
 *               pass (adamkit_step_q8 instead of adamkit_step)
 *   M_8BIT, V_8BIT, V_MAX_8BIT   with Q8, which of m, v and v_max are 8-bit; the others
 *               are in the parameter's dtype, read and written as adamkit_step does them
 *               (ADOPT keeps v in full precision beside an 8-bit m); 8-bit m and v round
 *               stochastically where adamkit_step_q8 is given its tensors' keys
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#if !defined(ALGORITHM) || !defined(DTYPE) || !defined(KAHAN) || !defined(L2) || \
    !defined(DECAY) || !defined(UPDATE) || !defined(AMSGRAD) || !defined(ADAPTIVE) || \
    !defined(GRAD_TERM) || !defined(INIT) || !defined(CLIP) || !defined(Q8) || \
    !defined(M_8BIT) || !defined(V_8BIT) || !defined(V_MAX_8BIT) || !defined(STOCHASTIC)
#error "every switch is set by core/backends/cpu_kernel.py (-DNAME=0 or 1)"
#endif
#if !Q8 && (M_8BIT || V_8BIT || V_MAX_8BIT)
#error "an 8-bit moment needs the Q8 entry point"
#endif
#if STOCHASTIC && (KAHAN || (DTYPE != 3 && DTYPE != 4))
#error "stochastic rounding is for bfloat16 and float16 parameters without a Kahan buffer"
#endif

/* ---- storage types and the compute precision (fp32 for every 16-bit type) ---------- */

static inline float as_float(uint32_t bits) {
    float out;
    memcpy(&out, &bits, sizeof out);
    return out;
}
static inline uint32_t as_bits(float x) {
    uint32_t out;
    memcpy(&out, &x, sizeof out);
    return out;
}

#if DTYPE == 1 || DTYPE == 2
#if DTYPE == 1
typedef float store_t;
#define SQRT sqrtf
#define MULTIPLY_ADD fmaf
#else
typedef double store_t;
#define SQRT sqrt
#define MULTIPLY_ADD fma
#endif
typedef store_t compute_t;
static inline compute_t load(const store_t *a, int64_t i) { return a[i]; }
static inline store_t round_to_store(compute_t x) { return x; }
static inline compute_t widen(store_t x) { return x; }
#elif DTYPE == 3 || DTYPE == 4
typedef uint16_t store_t;
typedef float compute_t;
/* The conversions are written with integer operations and selects rather than library
 * calls or _Float16 so that compilers vectorise them. */
#if DTYPE == 3
static inline compute_t widen(store_t x) { return as_float((uint32_t)x << 16); }
/* bfloat16: round to nearest even, NaN to the quiet NaN 0x7fc0, as c10::BFloat16 does. */
static inline store_t round_to_store(compute_t x) {
    uint32_t bits = as_bits(x);
    uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    return (bits & 0x7fffffffu) > 0x7f800000u ? (store_t)0x7fc0u : (store_t)rounded;
}
#else
/* IEEE half: exponent rebiased by 127 − 15 = 112; subnormals are exact multiples of 2^-24. */
static inline compute_t widen(store_t x) {
    uint32_t sign = (uint32_t)(x & 0x8000u) << 16;
    uint32_t magnitude = x & 0x7fffu;
    uint32_t bits = (magnitude << 13) + (112u << 23);
    bits += magnitude >= 0x7c00u ? 112u << 23 : 0u; /* infinity and NaN keep an all-ones exponent */
    float subnormal = (float)(int32_t)magnitude * 0x1p-24f;
    return as_float((magnitude < 0x0400u ? as_bits(subnormal) : bits) | sign);
}
/* Round to nearest even; overflow to infinity, NaN to a quiet NaN, both keeping the sign. */
static inline store_t round_to_store(compute_t x) {
    uint32_t bits = as_bits(x);
    uint32_t sign = (bits >> 16) & 0x8000u;
    uint32_t magnitude = bits & 0x7fffffffu;
    uint32_t rebiased = magnitude - (112u << 23);
    uint32_t normal = (rebiased + 0x0fffu + ((rebiased >> 13) & 1u)) >> 13;
    /* Below 2^-14 adding 0.5 makes the float's own rounding step 2^-24: the hardware rounds. */
    uint32_t subnormal = as_bits(as_float(magnitude) + 0.5f) - 0x3f000000u;
    uint32_t out = magnitude >= 0x38800000u ? normal : subnormal;
    out = magnitude >= 0x477ff000u ? 0x7c00u : out; /* at least 65520 rounds to infinity */
    out = magnitude > 0x7f800000u ? 0x7e00u : out;
    return (store_t)(out | sign);
}
#endif
static inline compute_t load(const store_t *a, int64_t i) { return widen(a[i]); }
#define SQRT sqrtf
#define MULTIPLY_ADD fmaf
#else
#error "unknown DTYPE"
#endif

static inline void put(store_t *a, int64_t i, compute_t x) { a[i] = round_to_store(x); }

/* core.random_bits.mix32 (uint32 multiplication wraps modulo 2^32, as the reference masks). */
static inline uint32_t mix32(uint32_t value) {
    value ^= value >> 16;
    value *= 0x7feb352du;
    value ^= value >> 15;
    value *= 0x846ca68bu;
    return value ^ (value >> 16);
}

/* core.random_bits.rounding_bits: element `index`'s 32 random bits under `key`. */
static inline uint32_t random_bits(int64_t index, uint32_t key) {
    return mix32((uint32_t)index * 0x9e3779b1u + key);
}

#if STOCHASTIC
#if DTYPE == 3
#define SR_MANTISSA_BITS 7
#define SR_MIN_EXPONENT (-126)
#else
#define SR_MANTISSA_BITS 10
#define SR_MIN_EXPONENT (-14)
#endif

/* A power of two 2^e (|e| ≤ 127) from its bits. */
static inline float power_of_two(int32_t e) { return as_float((uint32_t)(e + 127) << 23); }

/* precision.stochastic_round up to the final conversion: θ on the 16-bit grid, rounded
 * up or down with the reference's random bits for element `index` of the tensor whose
 * step key is `key`. Every operation is exact in fp32 (scaling by powers of two built
 * from their bits, in the reference's two halves; division by them as multiplication by
 * their exact reciprocals), so the result is the reference's bit for bit; non-finite
 * values pass through, to be rounded to nearest by round_to_store. */
static inline float stochastic_value(float theta, int64_t index, uint32_t key) {
    uint32_t bits = as_bits(theta);
    int finite = (bits & 0x7f800000u) != 0x7f800000u;
    float value = finite ? theta : 0.0f;
    int32_t exponent = (int32_t)((bits >> 23) & 0xffu) - 127;
    exponent = exponent < SR_MIN_EXPONENT ? SR_MIN_EXPONENT : exponent;
    int32_t shift = SR_MANTISSA_BITS - exponent;
    /* floor(shift / 2) for either sign, as the reference's shift // 2 */
    int32_t first = shift >= 0 ? shift / 2 : -((1 - shift) / 2);
    int32_t second = shift - first;
    float scaled = value * power_of_two(first) * power_of_two(second);
    float below = floorf(scaled);
    uint32_t random = random_bits(index, key);
    float uniform = (float)(random >> 8) * 0x1p-24f;
    float up = uniform < scaled - below ? 1.0f : 0.0f;
    float rounded = (below + up) * power_of_two(-first) * power_of_two(-second);
    return finite ? rounded : theta;
}
#endif

/* Round θ into place (stochastically under STOCHASTIC: element i of the tensor whose step
 * key is `key`); with Kahan keep in k what rounding lost. The one place θ is stored. */
static inline void store_param(store_t *param, store_t *comp, int64_t i, compute_t theta,
                               uint32_t key) {
#if STOCHASTIC
    theta = stochastic_value(theta, i, key);
#else
    (void)key;
#endif
    store_t rounded = round_to_store(theta);
    param[i] = rounded;
    if (KAHAN) comp[i] = round_to_store(theta - widen(rounded));
}

/* torch.lerp, exact at both ends whatever the weight: from + w·(to − from) for small w,
 * else to − (1 − w)·(to − from); written as base + coeff·(to − from) with coeff fixed per
 * step, so the choice costs one select per element. */
static inline compute_t lerp(compute_t from, compute_t to, compute_t coeff, int small_weight) {
    return (small_weight ? from : to) + coeff * (to - from);
}

/* NaN-propagating bounds, as torch.maximum and torch.clamp behave. */
static inline compute_t at_least(compute_t x, compute_t low) { return x < low ? low : x; }
static inline compute_t at_most(compute_t x, compute_t high) { return x > high ? high : x; }
static inline compute_t maximum(compute_t a, compute_t b) { return (a > b || a != a) ? a : b; }

/* ---- the scalars of a step, converted once to the compute precision ---------------- */

typedef struct {
    compute_t lerp_coeff, beta2, beta2_weight, eps, l2, param_decay;
    compute_t neg_momentum_step, neg_grad_step, inv_bias_correction2_sqrt, clip;
    int small_weight;
} scalars_t;

/* coefficients[]: 1 − β1, β2, 1 − β2, eps, l2, param_decay, momentum_step (ADOPT: lr),
 * grad_step, bias_correction2_sqrt, clip. One division per element is all the divider
 * can afford at memory speed, so √v / bias_correction2_sqrt becomes a multiplication. */
static scalars_t make_scalars(const double *c) {
    scalars_t s;
    compute_t weight = (compute_t)c[0];
    s.small_weight = fabs(c[0]) < 0.5;
    s.lerp_coeff = s.small_weight ? weight : weight - (compute_t)1;
    s.beta2 = (compute_t)c[1];
    s.beta2_weight = (compute_t)c[2];
    s.eps = (compute_t)c[3];
    s.l2 = (compute_t)c[4];
    s.param_decay = (compute_t)c[5];
    s.neg_momentum_step = (compute_t)(-c[6]);
    s.neg_grad_step = (compute_t)(-c[7]);
    s.inv_bias_correction2_sqrt = (compute_t)(1.0 / c[8]);
    s.clip = (compute_t)c[9];
    return s;
}

typedef struct {
    store_t *param, *comp, *exp_avg, *exp_avg_sq, *max_exp_avg_sq;
    const store_t *grad;
    uint32_t key; /* under STOCHASTIC, the tensor's key of this step */
} tensors_t;

/* The same inputs already widened to fp32, for one block (see update_block). */
typedef struct {
    const float *param, *comp, *exp_avg, *exp_avg_sq, *max_exp_avg_sq, *grad;
} widened_t;

/* What a configuration reads besides g: θ (and k) only where used, the moments except on
 * ADOPT's first call. */
#define READS_PARAM (L2 || (UPDATE && (ALGORITHM == 1 || !INIT)))
#define READS_MOMENTS (ALGORITHM == 1 || !INIT)

/* An input element: from the tensor, widened here, or from a block widened beforehand.
 * `widened` is a constant null or non-null pointer wherever update is inlined, so the
 * compiler keeps one branch. */
#define READ(field) (widened ? widened->field[i] : load(t->field, i))

/* What one element's step produces, in compute precision, before it is stored. Which
 * fields a configuration writes is fixed at compile time. */
typedef struct {
    compute_t theta, m, v, v_max;
} result_t;

#define WRITES_M (ALGORITHM == 1 || !INIT)
#define WRITES_V_MAX (ALGORITHM == 1 && AMSGRAD)
#define WRITES_PARAM (UPDATE && (ALGORITHM == 1 || !INIT))

/* ---- the per-element rules: each algorithm once ---------------------------------------- */

#if ALGORITHM == 1
/* Adam, AMSGrad, RAdam and NAdam (AdamStepCoefficients). */
static inline result_t update(const tensors_t *t, const widened_t *widened, const scalars_t *s,
                              int64_t i) {
    result_t r = {0, 0, 0, 0};
    compute_t grad = READ(grad);
    compute_t theta = READS_PARAM ? READ(param) : 0;
    if (READS_PARAM && KAHAN) theta = theta + READ(comp);
    if (L2) grad = MULTIPLY_ADD(s->l2, theta, grad); /* one rounding, as torch's add(alpha=) */
    r.m = lerp(READ(exp_avg), grad, s->lerp_coeff, s->small_weight);
    r.v = READ(exp_avg_sq) * s->beta2 + s->beta2_weight * grad * grad;
    compute_t second_moment = r.v;
    if (AMSGRAD) second_moment = r.v_max = maximum(READ(max_exp_avg_sq), r.v);
    if (!UPDATE) return r;
    if (DECAY) theta = theta * s->param_decay;
    if (ADAPTIVE) {
        compute_t denom = SQRT(second_moment) * s->inv_bias_correction2_sqrt + s->eps;
        if (GRAD_TERM) {
            compute_t inv_denom = (compute_t)1 / denom;
            theta = theta + s->neg_grad_step * grad * inv_denom;
            theta = theta + s->neg_momentum_step * r.m * inv_denom;
        } else {
            theta = theta + s->neg_momentum_step * r.m / denom;
        }
    } else {
        theta = theta + s->neg_momentum_step * r.m;
    }
    r.theta = theta;
    return r;
}
#elif ALGORITHM == 2
/* ADOPT (AdoptStepCoefficients); neg_momentum_step carries −lr. */
static inline result_t update(const tensors_t *t, const widened_t *widened, const scalars_t *s,
                              int64_t i) {
    result_t r = {0, 0, 0, 0};
    compute_t grad = READ(grad);
    compute_t theta = READS_PARAM ? READ(param) : 0;
    if (READS_PARAM && KAHAN) theta = theta + READ(comp);
    if (L2) grad = MULTIPLY_ADD(s->l2, theta, grad); /* one rounding, as torch's add(alpha=) */
    if (INIT) {
        r.v = grad * grad;
        return r;
    }
    compute_t v = READ(exp_avg_sq);
    compute_t normed = grad / at_least(SQRT(v), s->eps);
    if (CLIP) normed = at_most(at_least(normed, -s->clip), s->clip);
    r.m = lerp(READ(exp_avg), normed, s->lerp_coeff, s->small_weight);
    r.v = v * s->beta2 + s->beta2_weight * grad * grad;
    if (DECAY) theta = theta * s->param_decay;
    r.theta = theta + s->neg_momentum_step * r.m;
    return r;
}
#else
#error "unknown ALGORITHM"
#endif

/* Store one element's results, rounding each in software. */
static inline void write_element(const tensors_t *t, int64_t i, result_t r) {
    if (WRITES_V_MAX) put(t->max_exp_avg_sq, i, r.v_max);
    if (WRITES_M) put(t->exp_avg, i, r.m);
    put(t->exp_avg_sq, i, r.v);
    if (WRITES_PARAM) store_param(t->param, t->comp, i, r.theta, t->key);
}

/* ---- 16-bit stores a vector at a time ------------------------------------------------ */

/* Rounding fp32 to a 16-bit type one element at a time costs more than the memory traffic
 * of the whole step. AVX512-BF16 (vcvtneps2bf16) and AVX-512 (vcvtps2ph) round sixteen
 * lanes in one instruction, F16C (AVX2 CPUs) rounds eight to float16, and each agrees with
 * torch's conversion bit for bit on every non-NaN input but one kind: vcvtneps2bf16 flushes
 * fp32 subnormals to zero, where torch rounds them to bfloat16 subnormals. Lanes holding
 * one are rounded in software instead, a branch almost never taken. A NaN stays a NaN; its
 * payload, as in torch, is not kept. bfloat16 has no AVX2 instruction: there its integer
 * rounding (round_to_store's) runs eight lanes at a time. */
#if (DTYPE == 3 && defined(__AVX512BF16__)) || (DTYPE == 4 && defined(__AVX512DQ__))
#include <immintrin.h>
#define VECTOR_ROUNDING 1
#define LANES 16
typedef __m512 lanes_t;   /* LANES fp32 values */
typedef __m256i packed_t; /* LANES 16-bit values */
#define load_lanes _mm512_loadu_ps
#define store_lanes _mm512_storeu_ps
#define subtract_lanes _mm512_sub_ps
#define load_packed(in) _mm256_loadu_si256((const __m256i *)(in))
#define store_packed(out, x) _mm256_storeu_si256((__m256i *)(out), x)

/* vfpclassps category 0x20: subnormal (whatever MXCSR's denormals-are-zero says). */
static inline int needs_software(lanes_t x) {
    return DTYPE == 3 ? _mm512_fpclass_ps_mask(x, 0x20) != 0 : 0;
}

static inline packed_t round_lanes(lanes_t x) {
#if DTYPE == 3
    return (__m256i)_mm512_cvtneps_pbh(x);
#else
    return _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#endif
}

static inline lanes_t widen_lanes(packed_t x) {
#if DTYPE == 3
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
#else
    return _mm512_cvtph_ps(x);
#endif
}
#elif (DTYPE == 4 && defined(__F16C__) && defined(__AVX__)) || (DTYPE == 3 && defined(__AVX2__))
#include <immintrin.h>
#define VECTOR_ROUNDING 1
#define LANES 8
typedef __m256 lanes_t;
typedef __m128i packed_t;
#define load_lanes _mm256_loadu_ps
#define store_lanes _mm256_storeu_ps
#define subtract_lanes _mm256_sub_ps
#define load_packed(in) _mm_loadu_si128((const __m128i *)(in))
#define store_packed(out, x) _mm_storeu_si128((__m128i *)(out), x)
static inline int needs_software(lanes_t x) { return (void)x, 0; }
#if DTYPE == 4
static inline packed_t round_lanes(lanes_t x) {
    return _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
static inline lanes_t widen_lanes(packed_t x) { return _mm256_cvtph_ps(x); }
#else
/* round_to_store on eight lanes: subnormals need no care, as the integers round them too. */
static inline packed_t round_lanes(lanes_t x) {
    const __m256i bits = _mm256_castps_si256(x);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), odd), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), nan);
    /* every lane is below 2^16, so the saturating pack only narrows */
    return _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
}
static inline lanes_t widen_lanes(packed_t x) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x), 16));
}
#endif
#else
#define VECTOR_ROUNDING 0
#endif

#if VECTOR_ROUNDING
#define BLOCK 256

/* Round LANES lanes into out; returns them widened back, for Kahan's remainder. */
static inline lanes_t put_vector(store_t *out, lanes_t x) {
    packed_t rounded;
    if (__builtin_expect(needs_software(x), 0)) {
        _Alignas(64) float lanes[LANES];
        uint16_t software[LANES];
        store_lanes(lanes, x);
        for (int j = 0; j < LANES; j++) software[j] = round_to_store(lanes[j]);
        rounded = load_packed(software);
    } else {
        rounded = round_lanes(x);
    }
    store_packed(out, rounded);
    return widen_lanes(rounded);
}

static inline lanes_t put_lanes(store_t *out, const float *lanes) {
    return put_vector(out, load_lanes(lanes));
}

/* Round `count` (a multiple of LANES) staged lanes into out. */
static inline void put_block(store_t *out, const float *staged, int64_t count) {
    for (int64_t j = 0; j < count; j += LANES) put_lanes(out + j, staged + j);
}

/* Widen LANES elements into fp32 in one instruction. */
static inline void widen_into(float *out, const store_t *in) {
    store_lanes(out, widen_lanes(load_packed(in)));
}

/* Round the whole lanes of `count` staged parameters into θ from i (and Kahan's remainder
 * into k); returns how many that was. */
static inline int64_t store_param_lanes(const tensors_t *t, const float *theta, int64_t i,
                                        int64_t count) {
    int64_t j = 0;
    if (STOCHASTIC) return 0; /* θ is rounded by store_param, one element at a time */
    for (; j + LANES <= count; j += LANES) {
        const lanes_t x = load_lanes(theta + j);
        const lanes_t stored = put_vector(t->param + i + j, x);
        if (KAHAN) put_vector(t->comp + i + j, subtract_lanes(x, stored));
    }
    return j;
}

/* All `count` of them, the last partial lanes in software. */
static inline void store_params(const tensors_t *t, const float *theta, int64_t i,
                                int64_t count) {
    for (int64_t j = store_param_lanes(t, theta, i, count); j < count; j++)
        store_param(t->param, t->comp, i + j, theta[j], t->key);
}

/* BLOCK elements from i: the same update, its results staged in fp32 in L1 and then
 * rounded LANES lanes at a time. Staging a whole block rather than one vector keeps the
 * rounding's loads from waiting on the update's stores still in flight. fp16 inputs are
 * widened the same way first (vcvtph2ps), where software would need a dozen operations
 * each; widening bfloat16 is a shift, done in place. */
static inline void update_block(const tensors_t *t, const scalars_t *s, int64_t i,
                                int64_t count) {
    _Alignas(64) float theta[BLOCK], m[BLOCK], v[BLOCK], v_max[BLOCK];
#if DTYPE == 4
    _Alignas(64) float in_param[BLOCK], in_comp[BLOCK], in_grad[BLOCK], in_m[BLOCK],
        in_v[BLOCK], in_v_max[BLOCK];
    /* Every stream in one pass: a pass per stream measured half as fast again. */
    for (int64_t j = 0, k = i; j < count; j += LANES, k += LANES) {
        widen_into(in_grad + j, t->grad + k);
        if (READS_PARAM) widen_into(in_param + j, t->param + k);
        if (READS_PARAM && KAHAN) widen_into(in_comp + j, t->comp + k);
        if (READS_MOMENTS) widen_into(in_m + j, t->exp_avg + k);
        if (READS_MOMENTS) widen_into(in_v + j, t->exp_avg_sq + k);
        if (WRITES_V_MAX) widen_into(in_v_max + j, t->max_exp_avg_sq + k);
    }
    const widened_t inputs = {in_param, in_comp, in_m, in_v, in_v_max, in_grad};
    const widened_t *widened = &inputs;
#else
    const widened_t *widened = 0;
#endif
    for (int64_t j = 0; j < count; j++) {
        result_t r = widened ? update(t, widened, s, j) : update(t, 0, s, i + j);
        theta[j] = r.theta;
        m[j] = r.m;
        v[j] = r.v;
        v_max[j] = r.v_max;
    }
    if (WRITES_V_MAX) put_block(t->max_exp_avg_sq + i, v_max, count);
    if (WRITES_M) put_block(t->exp_avg + i, m, count);
    put_block(t->exp_avg_sq + i, v, count);
    /* count is whole lanes, so only stochastic rounding leaves elements to one at a time
     * (and gcc, seeing no loop after the lanes, does not warn it could overrun theta). */
    if (WRITES_PARAM && STOCHASTIC) store_params(t, theta, i, count);
    else if (WRITES_PARAM) store_param_lanes(t, theta, i, count);
}
#else
#define LANES 1
#define BLOCK 1
static inline void update_block(const tensors_t *t, const scalars_t *s, int64_t i,
                                int64_t count) {
    (void)t, (void)s, (void)i, (void)count;
}
static inline void store_params(const tensors_t *t, const compute_t *theta, int64_t i,
                                int64_t count) {
    for (int64_t j = 0; j < count; j++) store_param(t->param, t->comp, i + j, theta[j], t->key);
}
#endif

#if !Q8
/* One contiguous range of one tensor; restrict lets the compiler vectorise. */
static void update_range(store_t *restrict param, store_t *restrict comp,
                         const store_t *restrict grad, store_t *restrict exp_avg,
                         store_t *restrict exp_avg_sq, store_t *restrict max_exp_avg_sq,
                         uint32_t key, const scalars_t *s, int64_t begin, int64_t end) {
    tensors_t t = {param, comp, exp_avg, exp_avg_sq, max_exp_avg_sq, grad, key};
    scalars_t local = *s;
    int64_t i = begin;
    if (VECTOR_ROUNDING) {
        for (; i + BLOCK <= end; i += BLOCK) update_block(&t, &local, i, BLOCK);
        int64_t whole_lanes = (end - i) / LANES * LANES;
        update_block(&t, &local, i, whole_lanes);
        i += whole_lanes;
    }
    for (; i < end; i++) write_element(&t, i, update(&t, 0, &local, i));
}
#endif

/* Round n fp32 values to the storage type exactly as a step does, so tests can compare
 * the rounding with torch's conversion over every fp32 bit pattern. */
void adamkit_round(int64_t n, const float *values, store_t *out) {
    int64_t i = 0;
#if VECTOR_ROUNDING
    for (; i + LANES <= n; i += LANES) put_lanes(out + i, values + i);
#endif
    for (; i < n; i++) out[i] = round_to_store(values[i]);
}

#if STOCHASTIC
/* Round n fp32 values stochastically through store_param, value i as element i of a
 * tensor whose step key is `key`: tests hold it to precision.stochastic_round. */
void adamkit_round_stochastic(int64_t n, const float *values, store_t *out, uint32_t key) {
    for (int64_t i = 0; i < n; i++) store_param(out, 0, i, values[i], key);
}
#endif

/* ---- the optimizer's 0-dim float32 host scalars (step counts, NAdam's Π) ------------- */

/* One call for every parameter's scalar, where torch dispatches an operation per tensor
 * (about 2 µs each, the largest cost of a step over hundreds of small tensors). */
void adamkit_read_scalars(int64_t n, float *const *scalars, double *out) {
    for (int64_t k = 0; k < n; k++) out[k] = *scalars[k];
}

void adamkit_add_to_scalars(int64_t n, float *const *scalars, float amount) {
    for (int64_t k = 0; k < n; k++) *scalars[k] += amount;
}

void adamkit_multiply_scalars(int64_t n, float *const *scalars, float factor) {
    for (int64_t k = 0; k < n; k++) *scalars[k] *= factor;
}

/* Set each scalar to the value a replayed step computed for its twin (core.optimizer). */
void adamkit_write_scalars(int64_t n, float *const *scalars, const float *values) {
    for (int64_t k = 0; k < n; k++) *scalars[k] = values[k];
}

/* ---- many tensors per call, split across threads -------------------------------------- */

#define MAX_THREADS 64
#define MIN_ELEMENTS_PER_THREAD 65536

/* How many threads a step over `total` elements is worth. */
static int64_t share_count(int64_t total, int threads) {
    int64_t shares = total / MIN_ELEMENTS_PER_THREAD;
    if (shares > threads) shares = threads;
    if (shares > MAX_THREADS) shares = MAX_THREADS;
    return shares < 1 ? 1 : shares;
}

/* What runs the shares of a step, when the caller passes one: torch's own parallel_for
 * (core.backends.host_checks builds it), whose OpenMP threads are the ones torch's
 * operations just used. They keep spinning for more work after an operation, so threads
 * of our own started beside them measured 24-46% slower on two threads (medians of
 * benchmark.py's hand-off table). */
typedef void (*share_runner_t)(void *(*run)(void *), char *work, size_t size, int64_t shares);

/* run(work + j·size) for each of `shares` shares, all done when it returns: through
 * `runner` if given, else the first here and the others on threads of our own (or here
 * too, where no thread is to be had). */
static void run_shares(share_runner_t runner, void *(*run)(void *), char *work, size_t size,
                       int64_t shares) {
    if (runner && shares > 1) {
        runner(run, work, size, shares);
        return;
    }
    pthread_t handles[MAX_THREADS];
    int started[MAX_THREADS];
    for (int64_t j = 1; j < shares; j++)
        started[j] = pthread_create(&handles[j], 0, run, work + j * size) == 0;
    run(work);
    for (int64_t j = 1; j < shares; j++) {
        if (started[j])
            pthread_join(handles[j], 0);
        else
            run(work + j * size);
    }
}

static store_t *entry(void *const *list, int64_t index) {
    return list ? (store_t *)list[index] : (store_t *)0;
}

#if !Q8
typedef struct {
    int64_t count;
    const int64_t *sizes;
    void *const *lists[6]; /* param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, comp */
    const uint32_t *keys;  /* under STOCHASTIC, one per tensor; else null */
    scalars_t scalars;
    int64_t begin, end; /* this share, in the concatenation of every tensor */
} share_t;

static void *run_share(void *arg) {
    const share_t *w = (const share_t *)arg;
    int64_t offset = 0;
    for (int64_t k = 0; k < w->count && offset < w->end; k++) {
        int64_t size = w->sizes[k];
        int64_t begin = w->begin > offset ? w->begin - offset : 0;
        int64_t end = w->end - offset < size ? w->end - offset : size;
        if (begin < end) {
            update_range(entry(w->lists[0], k), entry(w->lists[5], k), entry(w->lists[1], k),
                         entry(w->lists[2], k), entry(w->lists[3], k), entry(w->lists[4], k),
                         w->keys ? w->keys[k] : 0u, &w->scalars, begin, end);
        }
        offset += size;
    }
    return 0;
}

#define SHARE_ALIGNMENT 64 /* elements: whole cache lines per thread, for every dtype */

/* The entry point: one step over `count` tensors of `sizes[k]` elements each (under
 * STOCHASTIC, tensor k rounded with keys[k]; threads may split a tensor anywhere, as an
 * element's bits depend only on its offset within its tensor). */
int adamkit_step(int64_t count, const int64_t *sizes, void *const *params, void *const *grads,
                 void *const *exp_avgs, void *const *exp_avg_sqs,
                 void *const *max_exp_avg_sqs, void *const *comps, const uint32_t *keys,
                 const double *coefficients, int threads, share_runner_t runner) {
    int64_t total = 0;
    for (int64_t k = 0; k < count; k++) total += sizes[k];
    int64_t shares = share_count(total, threads);
    int64_t per_share = (total + shares - 1) / shares;
    per_share = (per_share + SHARE_ALIGNMENT - 1) / SHARE_ALIGNMENT * SHARE_ALIGNMENT;

    share_t work[MAX_THREADS];
    for (int64_t j = 0; j < shares; j++) {
        share_t w = {count, sizes, {params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, comps},
                     keys, make_scalars(coefficients), j * per_share, (j + 1) * per_share};
        if (w.end > total) w.end = total;
        work[j] = w;
    }
    run_shares(runner, run_share, (char *)work, sizeof work[0], shares);
    return 0;
}
#else
/* ---- 8-bit moments (core.quantization): decode, step and encode one block at a time ---- */

#if DTYPE == 2
#error "8-bit moments are stepped for float32, bfloat16 and float16 parameters"
#endif

#define CODE_BLOCK 256 /* core.quantization.BLOCK_SIZE: elements per scale */

/* What adamkit_step_q8 knows of each map (cpu_kernel.py's map_words, from
 * core.quantization.CodeMap), signed map first, then unsigned, MAP_WORDS words each. With
 * g the map's group bits, a magnitude code c ≥ smallest_code stands for the fp32 number
 * whose bits are (bits(fp32(c + 1)) << g) + decode_offset (mod 2^32): CodeMap's rule, as
 * fp32(t) already holds t's group E in its exponent and t − 2^E in its mantissa. Encoding
 * runs the rule backwards on a normalized magnitude a with bits A ≥ lowest_bits:
 * fp32 bits (A >> g) + encode_offset are t's position between codes, linear within each
 * binade, so the nearest code (ties up) is floor(that − 1/2). */
#define MAP_WORDS 7
typedef struct {
    uint32_t group_bits, decode_offset, encode_offset, smallest_code, largest_code,
        lowest_bits, zero_below;
} code_map_t;
/* zero_below: m's normalized magnitudes with fewer bits take code 0 (else smallest_code);
 * for v it is 1 and tested on |x| itself, so that a positive v whose normalized magnitude
 * underflowed to 0 (|x| below 2^-149 of the scale) keeps the smallest code, as
 * core.quantization.quantize stores it. */

static inline code_map_t map_of(const uint32_t *words, int is_signed) {
    const uint32_t *w = words + (is_signed ? 0 : MAP_WORDS);
    code_map_t map = {w[0], w[1], w[2], w[3], w[4], w[5], w[6]};
    return map;
}

/* The block's elements of a parameter-dtype tensor in fp32: fp32 tensors are read in
 * place, 16-bit ones widened into buffer. */
static inline const float *widened_block(float *buffer, const store_t *in, int64_t count) {
#if DTYPE == 1
    (void)buffer, (void)count;
    return in;
#else
    int64_t j = 0;
#if VECTOR_ROUNDING && DTYPE == 4
    for (; j + LANES <= count; j += LANES) widen_into(buffer + j, in + j);
#endif
    for (; j < count; j++) buffer[j] = load(in, j);
    return buffer;
#endif
}

/* Codes decoded and encoded per vector: sixteen with AVX-512, eight with AVX2 (the same
 * arithmetic without masks or embedded rounding), else one at a time as the vectoriser
 * compiles them: on an AVX2 CPU that made the whole 8-bit step twice as slow as these
 * intrinsics (2.1 against 1.06 ns per element in L2). */
#if defined(__AVX512F__)
#include <immintrin.h>
#define CODE_LANES 16
#elif defined(__AVX2__)
#include <immintrin.h>
#define CODE_LANES 8
#else
#define CODE_LANES 1
#endif

/* The fp32 value (before scaling) of one code. */
static inline float code_value(uint32_t code, const code_map_t *map, int is_signed) {
    uint32_t magnitude = is_signed ? code & 0x7fu : code;
    uint32_t bits = (as_bits((float)(magnitude + 1)) << map->group_bits) + map->decode_offset;
    bits = magnitude >= map->smallest_code ? bits : 0u;
    return as_float(bits | (is_signed ? (code & 0x80u) << 24 : 0u));
}

/* map[code] · scale in fp32, as core.quantization.dequantize reads a moment back: with
 * AVX-512, sixteen codes at a time by the map's rule (code_value): a widening load, an
 * int-to-fp32 conversion, a shift and a masked add, the scale's product, and for m an and
 * and a ternary-logic or (the code is widened with its sign extended, so bit 31 is
 * already the sign). Decoding by table lookup instead (AVX-512 VBMI's vpermi2b, about
 * half the operations) made the whole step about 8% slower from memory on a Zen 5 EPYC,
 * and no faster in L2: its byte permutes and unpacks all queue for the shuffle units,
 * which this uses once per 16 codes. */
static inline void decode(float *out, const uint8_t *codes, float scale, const code_map_t *map,
                          int is_signed, int64_t count) {
    int64_t j = 0;
#if CODE_LANES == 16
    const __m512 scales = _mm512_set1_ps(scale);
    const __m128i group_bits = _mm_cvtsi32_si128((int)map->group_bits);
    const __m512i one = _mm512_set1_epi32(1), offset = _mm512_set1_epi32((int)map->decode_offset);
    const __m512i smallest = _mm512_set1_epi32((int)map->smallest_code);
    const __m512i low_bits = _mm512_set1_epi32(0x7f), sign = _mm512_set1_epi32((int)0x80000000u);
    for (; j + CODE_LANES <= count; j += CODE_LANES) {
        const __m128i packed = _mm_loadu_si128((const __m128i *)(codes + j));
        __m512i code = is_signed ? _mm512_cvtepi8_epi32(packed) : _mm512_cvtepu8_epi32(packed);
        __m512i magnitude = is_signed ? _mm512_and_si512(code, low_bits) : code;
        __m512i bits = _mm512_sll_epi32(
            _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_add_epi32(magnitude, one))), group_bits);
        bits = _mm512_maskz_add_epi32(_mm512_cmpge_epu32_mask(magnitude, smallest), bits, offset);
        if (is_signed) /* bits | (code & sign) */
            bits = _mm512_ternarylogic_epi32(bits, code, sign, 0xf8);
        _mm512_storeu_ps(out + j, _mm512_mul_ps(_mm512_castsi512_ps(bits), scales));
    }
#elif CODE_LANES == 8
    const __m256 scales = _mm256_set1_ps(scale);
    const __m128i group_bits = _mm_cvtsi32_si128((int)map->group_bits);
    const __m256i one = _mm256_set1_epi32(1), offset = _mm256_set1_epi32((int)map->decode_offset);
    /* magnitude ≥ smallest_code as magnitude > smallest_code − 1 (signed: both are small) */
    const __m256i below_smallest = _mm256_set1_epi32((int)map->smallest_code - 1);
    const __m256i low_bits = _mm256_set1_epi32(0x7f), sign = _mm256_set1_epi32((int)0x80000000u);
    for (; j + CODE_LANES <= count; j += CODE_LANES) {
        const __m128i packed = _mm_loadl_epi64((const __m128i *)(codes + j));
        __m256i code = is_signed ? _mm256_cvtepi8_epi32(packed) : _mm256_cvtepu8_epi32(packed);
        __m256i magnitude = is_signed ? _mm256_and_si256(code, low_bits) : code;
        __m256i bits = _mm256_sll_epi32(
            _mm256_castps_si256(_mm256_cvtepi32_ps(_mm256_add_epi32(magnitude, one))), group_bits);
        bits = _mm256_and_si256(_mm256_add_epi32(bits, offset),
                                _mm256_cmpgt_epi32(magnitude, below_smallest));
        if (is_signed) bits = _mm256_or_si256(bits, _mm256_and_si256(code, sign));
        _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_castsi256_ps(bits), scales));
    }
#endif
    for (; j < count; j++) out[j] = code_value(codes[j], map, is_signed) * scale;
}

/* The scale of a block whose largest magnitude has these bits (compared as integers: the
 * bits of |x| order as |x| does, and every NaN sorts above infinity): NaN if any element
 * is not finite, 0 below fp32's normal range (core.quantization.quantize). */
static inline float block_scale(uint32_t top) {
    if (top >= 0x7f800000u) return as_float(0x7fc00000u);
    return top < 0x00800000u ? 0.0f : as_float(top);
}

static inline uint32_t largest_bits(const float *x, int64_t count) {
    uint32_t top = 0;
    for (int64_t j = 0; j < count; j++) {
        uint32_t bits = as_bits(x[j]) & 0x7fffffffu;
        top = bits > top ? bits : top;
    }
    return top;
}

/* A block's scale (stored in scale_out) and its reciprocal, as both encoders start:
 * 0 where the block is zeros or has a NaN scale, whose codes are then all 0 (NaN · 0
 * would not be 0) and need no encoding. */
static inline int block_inverse(uint8_t *codes, float *scale_out, uint32_t top, int64_t count,
                                float *inverse) {
    float scale = block_scale(top);
    *scale_out = scale;
    if (!(scale > 0)) {
        memset(codes, 0, (size_t)count);
        return 0;
    }
    *inverse = 1.0f / scale;
    return 1;
}

#if CODE_LANES == 8
/* Sixteen codes, eight in each vector's dwords, stored as bytes in element order (three
 * shuffles). */
static inline void store_sixteen_codes(uint8_t *out, __m256i low, __m256i high) {
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    __m256i words = _mm256_packus_epi32(low, high);
    __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(words, words), order);
    _mm_storeu_si128((__m128i *)out, _mm256_castsi256_si128(bytes));
}
#endif

/* The code of one value: |x| · inverse (fp32), then its nearest code
 * (core.quantization.magnitude_codes); 0 for 0, m's sign in bit 7. In integers:
 * t = floor(position + 1/2) from the position's bits, exactly as the vector code's
 * round-down arithmetic finds it. */
static inline uint8_t nearest_code(float x, float inverse, const code_map_t *map, int is_signed) {
    uint32_t bits = as_bits(x), magnitude = bits & 0x7fffffffu;
    uint32_t normalized = as_bits(as_float(magnitude) * inverse);
    uint32_t clamped = normalized < map->lowest_bits ? map->lowest_bits : normalized;
    uint32_t position = (clamped >> map->group_bits) + map->encode_offset;
    uint32_t fraction_bits = 150u - (position >> 23); /* bits of the mantissa below t's units */
    uint32_t t = (((position & 0x7fffffu) | 0x800000u) + (1u << (fraction_bits - 1))) >> fraction_bits;
    uint32_t code = t - 1 < map->largest_code ? t - 1 : map->largest_code;
    code = (is_signed ? normalized : magnitude) < map->zero_below ? 0u : code;
    if (is_signed && code) code |= (bits >> 24) & 0x80u;
    return (uint8_t)code;
}

/* Codes of `count` new values of one block whose largest magnitude has bits `top`, and
 * its scale, as core.quantization.quantize stores them. */
static inline void encode(uint8_t *codes, float *scale_out, const float *x, uint32_t top,
                          const code_map_t *map, int is_signed, int64_t count) {
    float inverse;
    if (!block_inverse(codes, scale_out, top, count, &inverse)) return;
    int64_t j = 0;
#if CODE_LANES == 16
    const __m512 inverses = _mm512_set1_ps(inverse), integers = _mm512_set1_ps(0x1p23f - 0.5f);
    const __m512i magnitude_mask = _mm512_set1_epi32(0x7fffffff);
    const __m512i lowest = _mm512_set1_epi32((int)map->lowest_bits);
    const __m512i zero_below = _mm512_set1_epi32((int)map->zero_below);
    const __m512i offset = _mm512_set1_epi32((int)map->encode_offset);
    const __m128i group_bits = _mm_cvtsi32_si128((int)map->group_bits);
    const __m512i sign = _mm512_set1_epi32(0x80);
    /* The code, floor(position − 1/2), is found by one addition rounded down: position +
     * (2^23 − 1/2) lands in [2^23, 2^24), where fp32's units are integers, so its bits are
     * 2^23's plus the code and the low byte (all that is stored) is the code. Every kept
     * position is at least 1 (the smallest code's), so the sum never drops below 2^23.
     * Nothing is clamped above: |x| is at most the scale, so a normalized magnitude is at
     * most 1 + 2^-23, whose position rounds down to the largest code (each map's largest
     * value is 1: map_words checks it). Lanes below zero_below take code 0 through the
     * addition's mask; kept lanes hold a code > 0, so m's sign goes on each of them. */
    for (; j + CODE_LANES <= count; j += CODE_LANES) {
        __m512i bits = _mm512_loadu_si512(x + j);
        __m512i magnitude = _mm512_and_si512(bits, magnitude_mask);
        __m512i normalized =
            _mm512_castps_si512(_mm512_mul_ps(_mm512_castsi512_ps(magnitude), inverses));
        __m512i position = _mm512_add_epi32(
            _mm512_srl_epi32(_mm512_max_epu32(normalized, lowest), group_bits), offset);
        __mmask16 kept = _mm512_cmpge_epu32_mask(is_signed ? normalized : magnitude, zero_below);
        __m512i code = _mm512_castps_si512(
            _mm512_maskz_add_round_ps(kept, _mm512_castsi512_ps(position), integers,
                                      _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC));
        if (is_signed) /* code | (bits >> 24 & sign) in kept lanes, 0 in the others */
            code = _mm512_maskz_ternarylogic_epi32(kept, code, _mm512_srli_epi32(bits, 24), sign,
                                                   0xf8);
        _mm_storeu_si128((__m128i *)(codes + j), _mm512_cvtepi32_epi8(code));
    }
#elif CODE_LANES == 8
    const __m256 inverses = _mm256_set1_ps(inverse), half = _mm256_set1_ps(0.5f);
    const __m256i magnitude_mask = _mm256_set1_epi32(0x7fffffff);
    const __m256i lowest = _mm256_set1_epi32((int)map->lowest_bits);
    /* ≥ zero_below as a signed comparison: normalized and |x| are bits of non-negative floats */
    const __m256i below_zero_below = _mm256_set1_epi32((int)map->zero_below - 1);
    const __m256i offset = _mm256_set1_epi32((int)map->encode_offset);
    const __m128i group_bits = _mm_cvtsi32_si128((int)map->group_bits);
    const __m256i sign = _mm256_set1_epi32(0x80);
    /* As above, but floor(position − 1/2) by subtracting 1/2 (exact: position ≥ 1) and
     * truncating; sixteen values per iteration so that packing them into bytes takes
     * three shuffles. */
    for (; j + 2 * CODE_LANES <= count; j += 2 * CODE_LANES) {
        __m256i codes_of[2];
        for (int half_index = 0; half_index < 2; half_index++) {
            __m256i bits = _mm256_loadu_si256((const __m256i *)(x + j + half_index * CODE_LANES));
            __m256i magnitude = _mm256_and_si256(bits, magnitude_mask);
            __m256i normalized =
                _mm256_castps_si256(_mm256_mul_ps(_mm256_castsi256_ps(magnitude), inverses));
            __m256i position = _mm256_add_epi32(
                _mm256_srl_epi32(_mm256_max_epu32(normalized, lowest), group_bits), offset);
            __m256i code = _mm256_cvttps_epi32(_mm256_sub_ps(_mm256_castsi256_ps(position), half));
            if (is_signed)
                code = _mm256_or_si256(code, _mm256_and_si256(_mm256_srli_epi32(bits, 24), sign));
            codes_of[half_index] = _mm256_and_si256(
                code, _mm256_cmpgt_epi32(is_signed ? normalized : magnitude, below_zero_below));
        }
        store_sixteen_codes(codes + j, codes_of[0], codes_of[1]);
    }
#endif
    for (; j < count; j++) codes[j] = nearest_code(x[j], inverse, map, is_signed);
}

/* The stochastic code of one value (core.quantization, step 4): the position T of
 * |x| · inverse between codes, as nearest_code finds it, and t = floor(T + u) for u this
 * moment's random fraction (one_plus_uniform − 1). That is the reference's
 * floor((M + r) / 2^s), computed in fp32 exactly: below the largest code T < 2^8, so T is
 * on a grid of 2^-16 or finer, as u is, and T + u − 1 lies in [T − 1, T): 24 bits hold
 * it (a ≥ 1 takes the largest code either way). Below the smallest value (normalized bits
 * under lowest_bits) v keeps the smallest code (its position is that code's, exact, so
 * the floor is that code whatever u is; only 0 takes 0), and m takes it if u < a ·
 * below_scale (= a / the smallest value, exact), else 0. m's sign goes in bit 7 of a
 * nonzero code. */
static inline uint8_t stochastic_code(float x, float inverse, const code_map_t *map,
                                      int is_signed, float below_scale, float one_plus_u) {
    uint32_t bits = as_bits(x), magnitude = bits & 0x7fffffffu;
    uint32_t normalized = as_bits(as_float(magnitude) * inverse);
    uint32_t clamped = normalized < map->lowest_bits ? map->lowest_bits : normalized;
    uint32_t position = (clamped >> map->group_bits) + map->encode_offset;
    uint32_t code = (uint32_t)(as_float(position) + (one_plus_u - 2.0f)); /* t − 1 */
    code = code < map->largest_code ? code : map->largest_code;
    if (!is_signed) return magnitude < map->zero_below ? 0u : (uint8_t)code;
    if (normalized < map->lowest_bits)
        code = one_plus_u - 1.0f < as_float(normalized) * below_scale ? map->smallest_code : 0u;
    if (code) code |= (bits >> 24) & 0x80u;
    return (uint8_t)code;
}

/* (index + lane)·G + key as index·G + key plus the constant lane·G: no multiplication. */
#define LANE_TIMES_GOLDEN(l) (int)((uint32_t)(l) * 0x9e3779b1u)
#if CODE_LANES == 16
/* random_bits of sixteen consecutive elements from `index`. */
static inline __m512i random_lanes(int64_t index, uint32_t key) {
    const __m512i lanes = _mm512_setr_epi32(
        LANE_TIMES_GOLDEN(0), LANE_TIMES_GOLDEN(1), LANE_TIMES_GOLDEN(2), LANE_TIMES_GOLDEN(3),
        LANE_TIMES_GOLDEN(4), LANE_TIMES_GOLDEN(5), LANE_TIMES_GOLDEN(6), LANE_TIMES_GOLDEN(7),
        LANE_TIMES_GOLDEN(8), LANE_TIMES_GOLDEN(9), LANE_TIMES_GOLDEN(10), LANE_TIMES_GOLDEN(11),
        LANE_TIMES_GOLDEN(12), LANE_TIMES_GOLDEN(13), LANE_TIMES_GOLDEN(14),
        LANE_TIMES_GOLDEN(15));
    __m512i h = _mm512_add_epi32(
        _mm512_set1_epi32((int)((uint32_t)index * 0x9e3779b1u + key)), lanes);
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
    h = _mm512_mullo_epi32(h, _mm512_set1_epi32(0x7feb352d));
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 15));
    h = _mm512_mullo_epi32(h, _mm512_set1_epi32((int)0x846ca68bu));
    return _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
}
#elif CODE_LANES == 8
static inline __m256i random_lanes(int64_t index, uint32_t key) {
    const __m256i lanes = _mm256_setr_epi32(
        LANE_TIMES_GOLDEN(0), LANE_TIMES_GOLDEN(1), LANE_TIMES_GOLDEN(2), LANE_TIMES_GOLDEN(3),
        LANE_TIMES_GOLDEN(4), LANE_TIMES_GOLDEN(5), LANE_TIMES_GOLDEN(6), LANE_TIMES_GOLDEN(7));
    __m256i h = _mm256_add_epi32(
        _mm256_set1_epi32((int)((uint32_t)index * 0x9e3779b1u + key)), lanes);
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
    h = _mm256_mullo_epi32(h, _mm256_set1_epi32(0x7feb352d));
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 15));
    h = _mm256_mullo_epi32(h, _mm256_set1_epi32((int)0x846ca68bu));
    return _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
}
#endif

/* One element's 32 random bits serve both of its moments (core.quantization.moment_bits):
 * v rounds with their high 16 bits, m with their low 16. As a fraction those 16 bits are
 * u in [0, 1) on a 2^-16 grid, given here as the fp32 number 1 + u, built from its bits. */
static inline float one_plus_uniform(uint32_t word, int is_signed) {
    uint32_t half = is_signed ? word & 0xffffu : word >> 16;
    return as_float(0x3f800000u | (half << 7));
}
#if CODE_LANES == 16
static inline __m512 one_plus_uniform_lanes(__m512i words, int is_signed) {
    __m512i fraction = is_signed ? _mm512_slli_epi32(words, 7) : _mm512_srli_epi32(words, 9);
    return _mm512_castsi512_ps(_mm512_ternarylogic_epi32( /* the 16 bits | 1.0's bits */
        fraction, _mm512_set1_epi32(0x7fff80), _mm512_set1_epi32(0x3f800000), 0xea));
}
#elif CODE_LANES == 8
static inline __m256 one_plus_uniform_lanes(__m256i words, int is_signed) {
    __m256i fraction = is_signed ? _mm256_slli_epi32(words, 7) : _mm256_srli_epi32(words, 9);
    return _mm256_castsi256_ps(_mm256_or_si256(
        _mm256_and_si256(fraction, _mm256_set1_epi32(0x7fff80)), _mm256_set1_epi32(0x3f800000)));
}
#endif

/* random_bits of `count` consecutive elements from `first` under `key`, into words. */
static inline void random_words(uint32_t *words, int64_t first, int64_t count, uint32_t key) {
    int64_t j = 0;
#if CODE_LANES == 16
    for (; j + CODE_LANES <= count; j += CODE_LANES)
        _mm512_storeu_si512(words + j, random_lanes(first + j, key));
#elif CODE_LANES == 8
    for (; j + CODE_LANES <= count; j += CODE_LANES)
        _mm256_storeu_si256((__m256i *)(words + j), random_lanes(first + j, key));
#endif
    for (; j < count; j++) words[j] = random_bits(first + j, key);
}

/* encode rounding stochastically with the elements' random bits `words` (random_words),
 * of which this moment takes its half (one_plus_uniform): the same scale, and
 * stochastic_code per element, vectorised as encode is (u − 1 added to the position in
 * place of its −1/2). */
static inline void encode_stochastic(uint8_t *codes, float *scale_out, const float *x,
                                     uint32_t top, const code_map_t *map, int is_signed,
                                     int64_t count, const uint32_t *words) {
    float inverse;
    if (!block_inverse(codes, scale_out, top, count, &inverse)) return;
    /* 1 / the smallest value: 2^(127 − its biased exponent), from its bits */
    const float below_scale = as_float((254u - (map->lowest_bits >> 23)) << 23);
    int64_t j = 0;
#if CODE_LANES == 16
    const __m512 inverses = _mm512_set1_ps(inverse), below_scales = _mm512_set1_ps(below_scale);
    const __m512 one = _mm512_set1_ps(1.0f), two = _mm512_set1_ps(2.0f);
    const __m512i smallest = _mm512_set1_epi32((int)map->smallest_code);
    const __m512i sign = _mm512_set1_epi32(0x80);
    const __m512i magnitude_mask = _mm512_set1_epi32(0x7fffffff);
    const __m512i lowest = _mm512_set1_epi32((int)map->lowest_bits);
    const __m512i zero_below = _mm512_set1_epi32((int)map->zero_below);
    const __m512i offset = _mm512_set1_epi32((int)map->encode_offset);
    const __m512i largest = _mm512_set1_epi32((int)map->largest_code);
    const __m128i group_bits = _mm_cvtsi32_si128((int)map->group_bits);
    for (; j + CODE_LANES <= count; j += CODE_LANES) {
        __m512i bits = _mm512_loadu_si512(x + j);
        __m512i magnitude = _mm512_and_si512(bits, magnitude_mask);
        __m512i normalized =
            _mm512_castps_si512(_mm512_mul_ps(_mm512_castsi512_ps(magnitude), inverses));
        __m512i position = _mm512_add_epi32(
            _mm512_srl_epi32(_mm512_max_epu32(normalized, lowest), group_bits), offset);
        __m512 one_plus_u = one_plus_uniform_lanes(_mm512_loadu_si512(words + j), is_signed);
        __m512i code = _mm512_min_epu32(
            _mm512_cvttps_epi32(_mm512_add_ps(_mm512_castsi512_ps(position),
                                              _mm512_sub_ps(one_plus_u, two))),
            largest); /* t − 1, as stochastic_code */
        if (is_signed) { /* below the smallest value: the smallest code or 0, at random */
            __mmask16 below = _mm512_cmplt_epu32_mask(normalized, lowest);
            __mmask16 up = _mm512_cmp_ps_mask(
                _mm512_sub_ps(one_plus_u, one),
                _mm512_mul_ps(_mm512_castsi512_ps(normalized), below_scales), _CMP_LT_OQ);
            code = _mm512_mask_mov_epi32(code, below, _mm512_maskz_mov_epi32(up, smallest));
            __mmask16 nonzero = _mm512_test_epi32_mask(code, code);
            code = _mm512_mask_ternarylogic_epi32(code, nonzero, _mm512_srli_epi32(bits, 24),
                                                  sign, 0xf8); /* code | (bits >> 24 & sign) */
        } else {
            code = _mm512_maskz_mov_epi32(_mm512_cmpge_epu32_mask(magnitude, zero_below), code);
        }
        _mm_storeu_si128((__m128i *)(codes + j), _mm512_cvtepi32_epi8(code));
    }
#elif CODE_LANES == 8
    const __m256 inverses = _mm256_set1_ps(inverse), below_scales = _mm256_set1_ps(below_scale);
    const __m256 one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f);
    const __m256i smallest = _mm256_set1_epi32((int)map->smallest_code);
    const __m256i sign = _mm256_set1_epi32(0x80), zero = _mm256_setzero_si256();
    const __m256i magnitude_mask = _mm256_set1_epi32(0x7fffffff);
    const __m256i lowest = _mm256_set1_epi32((int)map->lowest_bits);
    const __m256i below_zero_below = _mm256_set1_epi32((int)map->zero_below - 1);
    const __m256i offset = _mm256_set1_epi32((int)map->encode_offset);
    const __m256i largest = _mm256_set1_epi32((int)map->largest_code);
    const __m128i group_bits = _mm_cvtsi32_si128((int)map->group_bits);
    for (; j + 2 * CODE_LANES <= count; j += 2 * CODE_LANES) {
        __m256i codes_of[2];
        for (int half_index = 0; half_index < 2; half_index++) {
            int64_t at = j + half_index * CODE_LANES;
            __m256i bits = _mm256_loadu_si256((const __m256i *)(x + at));
            __m256i magnitude = _mm256_and_si256(bits, magnitude_mask);
            __m256i normalized =
                _mm256_castps_si256(_mm256_mul_ps(_mm256_castsi256_ps(magnitude), inverses));
            __m256i position = _mm256_add_epi32(
                _mm256_srl_epi32(_mm256_max_epu32(normalized, lowest), group_bits), offset);
            __m256 one_plus_u = one_plus_uniform_lanes(
                _mm256_loadu_si256((const __m256i *)(words + at)), is_signed);
            __m256i code = _mm256_min_epu32(
                _mm256_cvttps_epi32(_mm256_add_ps(_mm256_castsi256_ps(position),
                                                  _mm256_sub_ps(one_plus_u, two))),
                largest); /* t − 1, as stochastic_code */
            if (is_signed) { /* below the smallest value: the smallest code or 0, at random */
                /* normalized < lowest as a signed comparison: bits of non-negative floats */
                __m256i below = _mm256_cmpgt_epi32(lowest, normalized);
                __m256 up = _mm256_cmp_ps(
                    _mm256_sub_ps(one_plus_u, one),
                    _mm256_mul_ps(_mm256_castsi256_ps(normalized), below_scales), _CMP_LT_OQ);
                __m256i below_code = _mm256_and_si256(smallest, _mm256_castps_si256(up));
                code = _mm256_blendv_epi8(code, below_code, below);
                __m256i nonzero = _mm256_xor_si256(_mm256_cmpeq_epi32(code, zero),
                                                   _mm256_set1_epi32(-1));
                code = _mm256_or_si256(
                    code, _mm256_and_si256(_mm256_and_si256(_mm256_srli_epi32(bits, 24), sign),
                                           nonzero));
                codes_of[half_index] = code;
            } else {
                codes_of[half_index] =
                    _mm256_and_si256(code, _mm256_cmpgt_epi32(magnitude, below_zero_below));
            }
        }
        store_sixteen_codes(codes + j, codes_of[0], codes_of[1]);
    }
#endif
    for (; j < count; j++)
        codes[j] =
            stochastic_code(x[j], inverse, map, is_signed, below_scale,
                            one_plus_uniform(words[j], is_signed));
}

/* Quantize `count` values as one row with the signed or the unsigned map of `words` (both
 * maps, as adamkit_step_q8 takes them). Test hook: the encoding every step uses, against
 * core.quantization.quantize on chosen values. */
void adamkit_quantize(int64_t count, const float *values, uint8_t *codes, float *absmax,
                      const uint32_t *words, int is_signed) {
    const code_map_t map = map_of(words, is_signed);
    for (int64_t b = 0; b * CODE_BLOCK < count; b++) {
        int64_t n = count - b * CODE_BLOCK < CODE_BLOCK ? count - b * CODE_BLOCK : CODE_BLOCK;
        const float *x = values + b * CODE_BLOCK;
        encode(codes + b * CODE_BLOCK, absmax + b, x, largest_bits(x, n), &map, is_signed, n);
    }
}

/* adamkit_quantize rounding stochastically under `key` (element i of the row draws
 * random_bits(i, key), this moment its half of them). Test hook: against
 * core.quantization.quantize with that key. */
void adamkit_quantize_stochastic(int64_t count, const float *values, uint8_t *codes,
                                 float *absmax, const uint32_t *words, int is_signed,
                                 uint32_t key) {
    const code_map_t map = map_of(words, is_signed);
    for (int64_t b = 0; b * CODE_BLOCK < count; b++) {
        int64_t n = count - b * CODE_BLOCK < CODE_BLOCK ? count - b * CODE_BLOCK : CODE_BLOCK;
        const float *x = values + b * CODE_BLOCK;
        _Alignas(64) uint32_t drawn[CODE_BLOCK]; /* (`words` names the maps here) */
        random_words(drawn, b * CODE_BLOCK, n, key);
        encode_stochastic(codes + b * CODE_BLOCK, absmax + b, x, largest_bits(x, n), &map,
                          is_signed, n, drawn);
    }
}

/* Read back `count` codes of one row with the signed or the unsigned map of `words`, block
 * b scaled by absmax[b]. Test hook: the decoding every step uses, against
 * core.quantization.dequantize on every code. */
void adamkit_dequantize(int64_t count, const uint8_t *codes, const float *absmax, float *values,
                        const uint32_t *words, int is_signed) {
    const code_map_t map = map_of(words, is_signed);
    for (int64_t b = 0; b * CODE_BLOCK < count; b++) {
        int64_t n = count - b * CODE_BLOCK < CODE_BLOCK ? count - b * CODE_BLOCK : CODE_BLOCK;
        decode(values + b * CODE_BLOCK, codes + b * CODE_BLOCK, absmax[b], &map, is_signed, n);
    }
}

typedef struct {
    store_t *param, *comp;
    const store_t *grad;
    uint32_t key; /* under STOCHASTIC, the tensor's key of this step */
    uint32_t state_key; /* the key of this step's random bits for 8-bit m and v ... */
    int state_stochastic; /* ... where they round stochastically (keys were given) */
    void *moments[3]; /* m, v, v_max: uint8 codes where 8-bit, else store_t elements */
    float *absmax[3]; /* the 8-bit moments' scales */
} quantized_t;

/* Round `count` values into a parameter-dtype tensor: LANES lanes at a time where the
 * CPU rounds vectors, the rest one at a time. */
static inline void put_all(store_t *out, const float *x, int64_t count) {
    int64_t j = 0;
#if VECTOR_ROUNDING
    for (; j + LANES <= count; j += LANES) put_lanes(out + j, x + j);
#endif
    for (; j < count; j++) put(out, j, x[j]);
}

/* The larger of a running maximum and |x|'s bits (see block_scale). */
static inline uint32_t top_bits(uint32_t top, float x) {
    uint32_t bits = as_bits(x) & 0x7fffffffu;
    return bits > top ? bits : top;
}

/* fp32 θ is stored as the update makes it, element by element in the update pass: staging
 * it for a second pass, as rounding a 16-bit θ needs, measured 8% slower. */
#define THETA_IN_PLACE (DTYPE == 1 && !KAHAN)

/* Blocks stepped in one pass of update_quantized_blocks: two measured about 10% faster
 * than one from memory on one thread (longer runs of each stream), and more slower. */
#define PASS_BLOCKS 2
#define PASS_ELEMENTS (PASS_BLOCKS * CODE_BLOCK)

static inline int64_t smaller(int64_t a, int64_t b) { return a < b ? a : b; }

/* `count` elements of one row from element `start`, whose first block's scale index is
 * `block` (at most PASS_BLOCKS blocks): the 8-bit moments decoded (and 16-bit inputs
 * widened) into L1; update() on every element, keeping each block's new largest
 * magnitudes (and storing fp32 θ); then the new moments encoded (or rounded) and a 16-bit
 * θ rounded. Each byte of memory is read once and written once. Decoding inside the update
 * pass, by hand or by the vectoriser, measured slower than these separate simple passes. */
static void update_quantized_blocks(const quantized_t *q, const scalars_t *s,
                                    const code_map_t *maps, int64_t start, int64_t count,
                                    int64_t block) {
    _Alignas(64) float in_param[PASS_ELEMENTS], in_comp[PASS_ELEMENTS], in_grad[PASS_ELEMENTS];
    _Alignas(64) float in_moments[3][PASS_ELEMENTS];
    _Alignas(64) float theta[PASS_ELEMENTS], m[PASS_ELEMENTS], v[PASS_ELEMENTS],
        v_max[PASS_ELEMENTS];
    const int64_t blocks = (count + CODE_BLOCK - 1) / CODE_BLOCK;
    widened_t inputs = {0, 0, 0, 0, 0, 0};
    inputs.grad = widened_block(in_grad, q->grad + start, count);
    if (READS_PARAM) inputs.param = widened_block(in_param, q->param + start, count);
    if (READS_PARAM && KAHAN) inputs.comp = widened_block(in_comp, q->comp + start, count);
    const int eight_bit[3] = {M_8BIT, V_8BIT, V_MAX_8BIT};
    const float *moments[3] = {0, 0, 0};
    for (int which = 0; which < 3; which++) {
        if (!(which == 2 ? WRITES_V_MAX : READS_MOMENTS)) continue;
        if (eight_bit[which]) {
            for (int64_t k = 0, j = 0; k < blocks; k++, j += CODE_BLOCK)
                decode(in_moments[which] + j, (const uint8_t *)q->moments[which] + start + j,
                       q->absmax[which][block + k], &maps[which == 0 ? 0 : 1], which == 0,
                       smaller(count - j, CODE_BLOCK));
            moments[which] = in_moments[which];
        } else {
            moments[which] = widened_block(in_moments[which],
                                           (const store_t *)q->moments[which] + start, count);
        }
    }
    inputs.exp_avg = moments[0];
    inputs.exp_avg_sq = moments[1];
    inputs.max_exp_avg_sq = moments[2];
    const tensors_t t = {q->param, q->comp, 0, 0, 0, q->grad, q->key};
    const scalars_t local = *s; /* not aliased by the stores below, as far as the compiler knows */
    store_t *restrict param = q->param + start;
    uint32_t tops[3][PASS_BLOCKS];
    for (int64_t k = 0; k < blocks; k++) {
        uint32_t top_m = 0, top_v = 0, top_v_max = 0;
        for (int64_t j = k * CODE_BLOCK; j < smaller(count, (k + 1) * CODE_BLOCK); j++) {
            result_t r = update(&t, &inputs, &local, j);
            if (WRITES_PARAM && THETA_IN_PLACE)
                param[j] = r.theta;
            else if (WRITES_PARAM)
                theta[j] = r.theta;
            if (WRITES_M) m[j] = r.m;
            v[j] = r.v;
            if (WRITES_V_MAX) v_max[j] = r.v_max;
            if (M_8BIT) top_m = top_bits(top_m, r.m);
            if (V_8BIT) top_v = top_bits(top_v, r.v);
            if (V_MAX_8BIT && WRITES_V_MAX) top_v_max = top_bits(top_v_max, r.v_max);
        }
        tops[0][k] = top_m;
        tops[1][k] = top_v;
        tops[2][k] = top_v_max;
    }
    _Alignas(64) uint32_t words[PASS_ELEMENTS]; /* both 8-bit moments' random bits */
    if (q->state_stochastic && (M_8BIT || V_8BIT)) random_words(words, start, count, q->state_key);
    const float *results[3] = {m, v, v_max};
    for (int which = 0; which < 3; which++) {
        if (!(which == 0 ? WRITES_M : which == 1 ? 1 : WRITES_V_MAX)) continue;
        if (eight_bit[which] && which < 2 && q->state_stochastic)
            for (int64_t k = 0, j = 0; k < blocks; k++, j += CODE_BLOCK)
                encode_stochastic((uint8_t *)q->moments[which] + start + j,
                                  q->absmax[which] + block + k, results[which] + j,
                                  tops[which][k], &maps[which == 0 ? 0 : 1], which == 0,
                                  smaller(count - j, CODE_BLOCK), words + j);
        else if (eight_bit[which])
            for (int64_t k = 0, j = 0; k < blocks; k++, j += CODE_BLOCK)
                encode((uint8_t *)q->moments[which] + start + j, q->absmax[which] + block + k,
                       results[which] + j, tops[which][k], &maps[which == 0 ? 0 : 1],
                       which == 0, smaller(count - j, CODE_BLOCK));
        else
            put_all((store_t *)q->moments[which] + start, results[which], count);
    }
    if (WRITES_PARAM && !THETA_IN_PLACE) store_params(&t, theta, start, count);
}

typedef struct {
    int64_t count;
    const int64_t *sizes, *row_lengths;
    void *const *lists[9]; /* param, grad, comp, then codes (or elements) and absmax of m,
                              v, v_max */
    const uint32_t *keys;  /* under STOCHASTIC, one per tensor; else null */
    const uint32_t *state_keys; /* each tensor's key for its 8-bit m and v; null: nearest */
    const code_map_t *maps; /* signed (m), unsigned (v, v_max) */
    scalars_t scalars;
    int64_t begin, end; /* this share, in blocks of the concatenation of every tensor */
} quantized_share_t;

/* Blocks per row and in all of tensor k (none for an empty one). */
static int64_t blocks_per_row(int64_t row_length) {
    return (row_length + CODE_BLOCK - 1) / CODE_BLOCK;
}
static int64_t block_total(int64_t size, int64_t row_length) {
    return size && row_length ? size / row_length * blocks_per_row(row_length) : 0;
}

static void *run_quantized_share(void *arg) {
    const quantized_share_t *w = (const quantized_share_t *)arg;
    void *const *const *l = w->lists;
    int64_t offset = 0;
    for (int64_t k = 0; k < w->count && offset < w->end; k++) {
        int64_t row_length = w->row_lengths[k];
        int64_t blocks = block_total(w->sizes[k], row_length);
        int64_t begin = w->begin > offset ? w->begin - offset : 0;
        int64_t end = w->end - offset < blocks ? w->end - offset : blocks;
        quantized_t q = {entry(l[0], k),
                         entry(l[2], k),
                         entry(l[1], k),
                         w->keys ? w->keys[k] : 0u,
                         w->state_keys ? w->state_keys[k] : 0u,
                         w->state_keys != 0,
                         {entry(l[3], k), entry(l[5], k), entry(l[7], k)},
                         {(float *)entry(l[4], k), (float *)entry(l[6], k),
                          (float *)entry(l[8], k)}};
        int64_t per_row = blocks_per_row(row_length);
        for (int64_t b = begin, in_pass; b < end; b += in_pass) { /* never past a row's end */
            int64_t row = b / per_row, column = (b - row * per_row) * CODE_BLOCK;
            in_pass = smaller(smaller(per_row - (b - row * per_row), PASS_BLOCKS), end - b);
            update_quantized_blocks(&q, &w->scalars, w->maps, row * row_length + column,
                                    smaller(row_length - column, in_pass * CODE_BLOCK), b);
        }
        offset += blocks;
    }
    return 0;
}

/* The entry point for 8-bit moments: one step over `count` tensors of `sizes[k]` elements
 * in rows of `row_lengths[k]`, each 8-bit moment as uint8 codes and fp32 scales of shape
 * (rows, blocks per row), each other moment as its elements in the parameter's dtype (in
 * the codes' place, with no scales). state_keys: each tensor's key of this step for the
 * stochastic rounding of its 8-bit m and v (QuantizedMoment.key: each element's bits
 * hashed once, v rounding with their high half and m with their low), or null to round
 * them to nearest.
 * Threads take whole blocks, never part of one. */
int adamkit_step_q8(int64_t count, const int64_t *sizes, const int64_t *row_lengths,
                    void *const *params, void *const *grads, void *const *comps,
                    const uint32_t *keys, const uint32_t *state_keys, void *const *exp_avg_codes,
                    void *const *exp_avg_absmax,
                    void *const *exp_avg_sq_codes, void *const *exp_avg_sq_absmax,
                    void *const *max_exp_avg_sq_codes, void *const *max_exp_avg_sq_absmax,
                    const double *coefficients, const uint32_t *map_words, int threads,
                    share_runner_t runner) {
    int64_t total = 0, blocks = 0;
    for (int64_t k = 0; k < count; k++) {
        total += sizes[k];
        blocks += block_total(sizes[k], row_lengths[k]);
    }
    int64_t shares = share_count(total, threads);
    int64_t per_share = (blocks + shares - 1) / shares;
    const code_map_t maps[2] = {map_of(map_words, 1), map_of(map_words, 0)};
    quantized_share_t work[MAX_THREADS];
    for (int64_t j = 0; j < shares; j++) {
        quantized_share_t w = {count,
                               sizes,
                               row_lengths,
                               {params, grads, comps, exp_avg_codes, exp_avg_absmax,
                                exp_avg_sq_codes, exp_avg_sq_absmax, max_exp_avg_sq_codes,
                                max_exp_avg_sq_absmax},
                               keys,
                               state_keys,
                               maps,
                               make_scalars(coefficients),
                               j * per_share,
                               (j + 1) * per_share};
        if (w.end > blocks) w.end = blocks;
        work[j] = w;
    }
    run_shares(runner, run_quantized_share, (char *)work, sizeof work[0], shares);
    return 0;
}
#endif
