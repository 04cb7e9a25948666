/* The compiled part of lora_tools: two passes over tensor bytes that torch makes in several.
 *
 * - round_e4m3fn: fp32 -> float8_e4m3fn rounding with its error measured in the same pass (lora_tools.io.fp8).
 * - largest_bits16: the largest magnitude of fp16/bf16 bytes as bits (lora_tools.io.magnitudes: the
 *   fp8 scale's first guess, a LoRA's NaN check).
 *
 * Optional: lora_tools uses torch or numpy when this module is not built (setup.py builds it where a C
 * compiler is found) or when SIMD is false. The results are the same bit for bit (tests/test_native.py
 * holds them to torch's own cast and max). Plain C with GCC/Clang vector extensions: on x86-64 the AVX2 copy is
 * chosen at load time (GCC's target_clones); without AVX2 the vectors are emulated and slower than
 * torch, so SIMD says whether to use it.
 *
 * Rounding to nearest, ties to even, without a table: for a magnitude a in the binade [2^k, 2^(k+1)),
 * e4m3fn keeps 3 mantissa bits, so the result is a multiple of 2^(k-3) (of 2^-9 below 2^-6, the
 * subnormals). Adding c = 2^(k+20) (whose fp32 step is exactly that multiple) rounds a in fp32's own
 * round-to-nearest-even mode; taking c away again gives the rounded value r, which is also the
 * dequantised one, so the error a - r costs one subtraction. The code comes from the sum's bits: its
 * mantissa counts r's steps above c, and c's exponent is the binade's. The input's sign bit is kept.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define W 8 /* values per vector */
typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));
typedef uint32_t vu __attribute__((vector_size(4 * W)));
typedef uint8_t vq __attribute__((vector_size(4 * W)));

#define MIN_NORMAL_BITS (121 << 23) /* 2^-6, e4m3fn's smallest normal value, as fp32 bits */
#define STEP_SHIFT (20 << 23)       /* 2^k -> 2^(k+20): the fp32 step of 2^(k+20) is 2^(k-3) */

static inline __attribute__((always_inline)) vi pick(vi mask, vi yes, vi no) { return (yes & mask) | (no & ~mask); }

/* W values: their codes, and the squares of their errors and values, their saturations and largest
 * magnitude (as fp32 bits) added to the accumulators. `clamp` is a constant where this is inlined. */
static inline __attribute__((always_inline)) void round_group(const float *x, uint8_t *codes, vf inv, vf limit,
                                                              int clamp, vf *err, vf *ref, vi *saturated, vi *top)
{
    vf v;
    memcpy(&v, x, sizeof v);
    vi bits = (vi)v;
    vi mag = bits & 0x7fffffff;
    *top = pick(*top > mag, *top, mag);
    vf scaled = (vf)mag * inv; /* exact: inv is a power of two */
    vf a = scaled;
    if (clamp) {
        vi over = scaled > limit;
        *saturated -= over;
        a = (vf)pick(over, (vi)limit, (vi)scaled);
    }
    vi binade = (vi)a & 0x7f800000;
    binade = pick(binade < MIN_NORMAL_BITS, (vi){0} + MIN_NORMAL_BITS, binade);
    vf c = (vf)((vu)binade + STEP_SHIFT); /* unsigned: a NaN's or Inf's binade wraps (its block is redone) */
    vf sum = a + c; /* rounded here: c's fp32 step is the e4m3fn step of a */
    vf r = sum - c;
    vf d = scaled - r; /* what the clamp took off counts too */
    *err += d * d;
    *ref += scaled * scaled;
    /* sum = c + r: its low 5 mantissa bits count r's e4m3fn steps above 0 (subnormal: 0..8) or above 2^k
     * (8..16, 16 when r rounded up into the next binade); with the binade's exponent, that is the code */
    vi code = ((binade >> 20) - (121 << 3) + ((vi)sum & 0x1f)) | ((bits >> 24) & 0x80);
    vq low_bytes = __builtin_shuffle((vq)code, (vq){0, 4, 8, 12, 16, 20, 24, 28});
    memcpy(codes, &low_bytes, W);
}

/* The values from i to stop (a multiple of W apart, or the last few: zero-padded) into the accumulators. */
static inline __attribute__((always_inline)) Py_ssize_t round_span(const float *x, uint8_t *codes, Py_ssize_t i,
                                                                   Py_ssize_t stop, vf inv, vf limit, int clamp,
                                                                   vf *err, vf *ref, vi *sat, vi *top)
{
    for (; i + W <= stop; i += W)
        round_group(x + i, codes + i, inv, limit, clamp, err, ref, sat, top);
    if (i < stop) {
        float tail[W] = {0};
        uint8_t tail_codes[W];
        memcpy(tail, x + i, (size_t)(stop - i) * sizeof(float));
        round_group(tail, tail_codes, inv, limit, clamp, err, ref, sat, top);
        memcpy(codes + i, tail_codes, (size_t)(stop - i));
        i = stop;
    }
    return i;
}

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v4", "avx2,fma", "default")))
#endif
static void round_block(const float *restrict x, uint8_t *restrict codes, Py_ssize_t n, float inv_scale,
                        float limit, double *err_sq, double *ref_sq, Py_ssize_t *saturated, int32_t *amax_bits)
{
    vf inv = (vf){0} + inv_scale, lim = (vf){0} + limit;
    int clamp = limit < HUGE_VALF;
    vi top = {0};
    double err_total = 0, ref_total = 0;
    Py_ssize_t sat_total = 0, i = 0;
    while (i < n) {
        /* fp32 sums over at most 8192 values a lane, then added up in double */
        vf err = {0}, ref = {0};
        vi sat = {0};
        Py_ssize_t stop = n - i > 8192 * W ? i + 8192 * W : n;
        if (clamp)
            i = round_span(x, codes, i, stop, inv, lim, 1, &err, &ref, &sat, &top);
        else
            i = round_span(x, codes, i, stop, inv, lim, 0, &err, &ref, &sat, &top);
        for (int j = 0; j < W; j++) {
            err_total += err[j];
            ref_total += ref[j];
            sat_total += sat[j];
        }
    }
    int32_t largest = 0;
    for (int j = 0; j < W; j++)
        largest = top[j] > largest ? top[j] : largest;
    *err_sq = err_total;
    *ref_sq = ref_total;
    *saturated = sat_total;
    *amax_bits = largest;
}

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#endif
static uint16_t largest_bits16_block(const uint16_t *restrict bits, Py_ssize_t n)
{
    uint16_t top = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint16_t magnitude = bits[i] & 0x7fff;
        top = magnitude > top ? magnitude : top;
    }
    return top;
}

static PyObject *largest_bits16(PyObject *Py_UNUSED(self), PyObject *arg)
{
    Py_buffer values;
    if (PyObject_GetBuffer(arg, &values, PyBUF_SIMPLE) < 0)
        return NULL;
    if (values.len % 2) {
        PyBuffer_Release(&values);
        PyErr_SetString(PyExc_ValueError, "largest_bits16: the bytes of 16-bit values (an even length)");
        return NULL;
    }
    uint16_t top;
    Py_BEGIN_ALLOW_THREADS
    top = largest_bits16_block((const uint16_t *)values.buf, values.len / 2);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&values);
    return PyLong_FromLong(top);
}

static PyObject *round_e4m3fn(PyObject *Py_UNUSED(self), PyObject *args)
{
    Py_buffer values, codes;
    float inv_scale, limit;
    if (!PyArg_ParseTuple(args, "y*w*ff:round_e4m3fn", &values, &codes, &inv_scale, &limit))
        return NULL;
    Py_ssize_t n = values.len / (Py_ssize_t)sizeof(float);
    if (values.len % (Py_ssize_t)sizeof(float) || codes.len < n) {
        PyBuffer_Release(&values);
        PyBuffer_Release(&codes);
        PyErr_SetString(PyExc_ValueError, "round_e4m3fn: values must be fp32 and codes hold one byte per value");
        return NULL;
    }
    double err_sq, ref_sq;
    Py_ssize_t saturated;
    int32_t amax_bits;
    Py_BEGIN_ALLOW_THREADS
    round_block((const float *)values.buf, (uint8_t *)codes.buf, n, inv_scale, limit, &err_sq, &ref_sq, &saturated,
                &amax_bits);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&values);
    PyBuffer_Release(&codes);
    float amax;
    memcpy(&amax, &amax_bits, sizeof amax);
    return Py_BuildValue("ddnd", err_sq, ref_sq, saturated, (double)amax);
}

static PyMethodDef methods[] = {
    {"round_e4m3fn", round_e4m3fn, METH_VARARGS,
     "round_e4m3fn(values, codes, inv_scale, limit) -> (err_sq, ref_sq, saturated, amax)\n\n"
     "Each fp32 value times inv_scale (a power of two), clamped to +-limit (unless it is inf), rounded to float8_e4m3fn\n"
     "(nearest, ties to even) into codes; the summed squares of the rounding errors and of the values\n"
     "(both times inv_scale: fp32 sums), how many were clamped, and the values' largest magnitude (NaN if any is NaN).\n"
     "Codes of NaN or infinite values are not torch's: the caller redoes such blocks."},
    {"largest_bits16", largest_bits16, METH_O,
     "largest_bits16(values) -> int\n\n"
     "The largest of the 16-bit values (little-endian bytes) with their top bit cleared: the bits of the\n"
     "largest magnitude of fp16 or bf16 values (at or above +inf's bits when one is NaN or infinite)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_native", "Passes over tensor bytes: fp8 rounding, 16-bit largest magnitudes.", -1,
    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__native(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    int simd = __builtin_cpu_supports("avx2") != 0;
#elif defined(__aarch64__)
    int simd = 1; /* NEON */
#else
    int simd = 0;
#endif
    if (PyModule_AddIntConstant(m, "SIMD", simd) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
