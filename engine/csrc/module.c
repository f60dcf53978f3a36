/* flashdesk.engine._kernels: the Python face of the C kernels.
 *
 * Every entry point that does real work releases the GIL, so the app's UI thread and the engine's
 * other threads keep running while a kernel streams memory.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#include "attention.h"
#include "bandwidth.h"
#include "cpu_features.h"
#include "experts.h"
#include "fd_platform.h"
#include "indexer.h"
#include "mhc.h"
#include "norm.h"
#include "rope.h"

static PyObject *py_cpu_features(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
    const fd_cpu_features *f;
    Py_BEGIN_ALLOW_THREADS
    f = fd_get_cpu_features();
    Py_END_ALLOW_THREADS
    return Py_BuildValue(
        "{s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:i}",
        "sse4_2", f->sse42 ? Py_True : Py_False,
        "avx", f->avx ? Py_True : Py_False,
        "avx2", f->avx2 ? Py_True : Py_False,
        "fma", f->fma ? Py_True : Py_False,
        "f16c", f->f16c ? Py_True : Py_False,
        "avx_vnni", f->avx_vnni ? Py_True : Py_False,
        "avx512f", f->avx512f ? Py_True : Py_False,
        "avx512bw", f->avx512bw ? Py_True : Py_False,
        "avx512vl", f->avx512vl ? Py_True : Py_False,
        "avx512dq", f->avx512dq ? Py_True : Py_False,
        "avx512_vnni", f->avx512_vnni ? Py_True : Py_False,
        "avx512_bf16", f->avx512_bf16 ? Py_True : Py_False,
        "avx512_vbmi", f->avx512_vbmi ? Py_True : Py_False,
        "amx", (f->amx_tile && (f->amx_bf16 || f->amx_int8)) ? Py_True : Py_False,
        "amx_bf16", f->amx_bf16 ? Py_True : Py_False,
        "amx_int8", f->amx_int8 ? Py_True : Py_False,
        "neon", f->neon ? Py_True : Py_False,
        "dotprod", f->dotprod ? Py_True : Py_False,
        "sve", f->sve ? Py_True : Py_False,
        "amx_tile", f->amx_tile ? Py_True : Py_False,
        "logical_cores", f->logical_cores);
}

static PyObject *py_read_bandwidth(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    static char *kwlist[] = {"nbytes", "threads", "min_seconds", "details", NULL};
    Py_ssize_t nbytes;
    int threads = 0;
    double min_seconds = 0.2;
    int details = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "n|idp:read_bandwidth", kwlist, &nbytes,
                                     &threads, &min_seconds, &details))
        return NULL;
    if (nbytes < 4096) {
        PyErr_SetString(PyExc_ValueError, "read_bandwidth: nbytes must be at least 4096");
        return NULL;
    }
    if (threads <= 0) threads = fd_get_cpu_features()->logical_cores;
    if (threads > 1024) {
        PyErr_SetString(PyExc_ValueError, "read_bandwidth: threads must be at most 1024");
        return NULL;
    }
    if (min_seconds < 0 || min_seconds > 60) {
        PyErr_SetString(PyExc_ValueError, "read_bandwidth: min_seconds must be in [0, 60]");
        return NULL;
    }
    fd_bandwidth_result r;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fd_read_bandwidth((size_t)nbytes, threads, min_seconds, &r);
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        PyErr_Format(PyExc_MemoryError,
                     "read_bandwidth: could not allocate a %zd-byte test buffer", nbytes);
        return NULL;
    }
    if (!details) return PyFloat_FromDouble(r.best_gbps);
    return Py_BuildValue("{s:d,s:d,s:i,s:d,s:n,s:i}", "best_gbps", r.best_gbps, "mean_gbps",
                         r.mean_gbps, "passes", r.passes, "seconds", r.seconds, "nbytes", nbytes,
                         "threads", threads);
}

/* ---------------------------------------------------------------- quant kernels
 *
 * The raw entry points take addresses (ints) and sizes: flashdesk.engine.kernels validates
 * shapes, dtypes and contiguity of numpy arrays / torch tensors and keeps them alive, then calls
 * these. Passing addresses lets any host buffer in (pinned torch tensors, memory-mapped shards)
 * without a copy and costs nothing per call.
 */

static const fd_quant_kernels *kernels_for(const char *isa) {
    if (!isa || !isa[0]) return fd_kernels_active();
    fd_kernels_active(); /* tables initialised */
    const fd_quant_kernels *k = fd_kernels_by_name(isa);
    if (!k) {
        PyErr_Format(PyExc_ValueError,
                     "unknown kernel variant '%s'; isa_variants() lists the ones this build has",
                     isa);
        return NULL;
    }
    if (!fd_kernels_supported(k)) {
        PyErr_Format(PyExc_ValueError,
                     "kernel variant %s does not run on this CPU (see cpu_features())", isa);
        return NULL;
    }
    return k;
}

static PyObject *py_isa_variants(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
    const fd_quant_kernels *list[8];
    int n = fd_kernels_compiled(list, 8);
    PyObject *out = PyDict_New();
    if (!out) return NULL;
    for (int i = 0; i < n; i++) {
        if (PyDict_SetItemString(out, list[i]->name,
                                 fd_kernels_supported(list[i]) ? Py_True : Py_False) < 0) {
            Py_DECREF(out);
            return NULL;
        }
    }
    return out;
}

static PyObject *py_isa_paths(PyObject *self, PyObject *args) {
    (void)self;
    const char *isa;
    if (!PyArg_ParseTuple(args, "s:isa_paths", &isa)) return NULL;
    const fd_quant_kernels *k = kernels_for(isa);
    if (!k) return NULL;
    return Py_BuildValue("{s:O,s:O,s:O,s:O}", "fp4_bf16", k->fp4_dot_bf16 ? Py_True : Py_False,
                         "fp4_int8", k->fp4_dot_q8 ? Py_True : Py_False, "fp8_bf16",
                         k->fp8_dot_bf16 ? Py_True : Py_False, "gemm_bf16",
                         k->gemm_bf16 ? Py_True : Py_False);
}

static PyObject *py_active_isa(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
    return PyUnicode_FromString(fd_kernels_active()->name);
}

static PyObject *py_set_isa(PyObject *self, PyObject *args) {
    (void)self;
    const char *name;
    if (!PyArg_ParseTuple(args, "s:set_isa", &name)) return NULL;
    const fd_quant_kernels *k;
    if (strcmp(name, "auto") == 0) {
        fd_kernels_active();
        k = fd_kernels_best();
    } else {
        k = kernels_for(name);
        if (!k) return NULL;
    }
    fd_kernels_set_active(k);
    return PyUnicode_FromString(k->name);
}

/* None, or the kernel's message as MemoryError (allocation) or ValueError (arguments). */
static PyObject *kernel_result(int rc, const char *err) {
    if (rc != 0) {
        PyErr_SetString(strstr(err, "memory") ? PyExc_MemoryError : PyExc_ValueError, err);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *py_expert_ffn(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long x, table, ids, weights, out;
    int x_bf16, T, D, I, n_experts, k, out_bf16, threads, x_q8 = 0;
    float limit;
    const char *isa;
    if (!PyArg_ParseTuple(args, "KpiiiKiKKifKpis|p:expert_ffn", &x, &x_bf16, &T, &D, &I, &table,
                          &n_experts, &ids, &weights, &k, &limit, &out, &out_bf16, &threads, &isa,
                          &x_q8))
        return NULL;
    const fd_quant_kernels *kern = kernels_for(isa);
    if (!kern) return NULL;
    char err[160] = {0};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fd_expert_ffn(kern, threads, (const void *)(uintptr_t)x, x_bf16, x_q8, T, D, I,
                       (const fd_fp4_expert *)(uintptr_t)table, n_experts,
                       (const int32_t *)(uintptr_t)ids, (const float *)(uintptr_t)weights, k,
                       limit, (void *)(uintptr_t)out, out_bf16, err, sizeof err);
    Py_END_ALLOW_THREADS
    return kernel_result(rc, err);
}

static PyObject *py_quant_linear(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long x, w, scale, out;
    int kind, x_bf16, M, groups, K, N, out_bf16, threads;
    const char *isa;
    if (!PyArg_ParseTuple(args, "iKpiiiKKiKpis:quant_linear", &kind, &x, &x_bf16, &M, &groups, &K,
                          &w, &scale, &N, &out, &out_bf16, &threads, &isa))
        return NULL;
    if (kind != FD_WEIGHT_FP4 && kind != FD_WEIGHT_FP4_INT8 && kind != FD_WEIGHT_FP8 &&
        kind != FD_WEIGHT_FP8_FINITE && kind != FD_WEIGHT_BF16) {
        PyErr_SetString(PyExc_ValueError, "quant_linear: kind must be 4/5 (FP4, FP4 with int8 "
                                          "activations), 8/9 (FP8/checked FP8) or 16 (BF16)");
        return NULL;
    }
    const fd_quant_kernels *kern = kernels_for(isa);
    if (!kern) return NULL;
    char err[160] = {0};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fd_quant_linear(kern, threads, kind, (const void *)(uintptr_t)x, x_bf16, M, groups, K,
                         (const uint8_t *)(uintptr_t)w, (const uint8_t *)(uintptr_t)scale, N,
                         (void *)(uintptr_t)out, out_bf16, err, sizeof err);
    Py_END_ALLOW_THREADS
    return kernel_result(rc, err);
}

static PyObject *py_fp8_decode_rows(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long w, scale, out;
    int K, first, n, threads;
    const char *isa;
    if (!PyArg_ParseTuple(args, "KKiiiKis:fp8_decode_rows", &w, &scale, &K, &first, &n, &out,
                          &threads, &isa))
        return NULL;
    const fd_quant_kernels *kern = kernels_for(isa);
    if (!kern) return NULL;
    char err[160] = {0};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fd_fp8_decode_rows(kern, threads, (const uint8_t *)(uintptr_t)w,
                            (const uint8_t *)(uintptr_t)scale, K, first, n,
                            (float *)(uintptr_t)out, err, sizeof err);
    Py_END_ALLOW_THREADS
    return kernel_result(rc, err);
}

static PyObject *py_advise_hugepages(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long address, nbytes;
    if (!PyArg_ParseTuple(args, "KK:advise_hugepages", &address, &nbytes)) return NULL;
    return PyLong_FromSize_t(fd_advise_hugepages((void *)(uintptr_t)address, (size_t)nbytes));
}

static PyObject *py_prefetch_pages(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long address, nbytes;
    if (!PyArg_ParseTuple(args, "KK:prefetch_pages", &address, &nbytes)) return NULL;
    size_t done;
    Py_BEGIN_ALLOW_THREADS
    done = fd_prefetch_pages((const void *)(uintptr_t)address, (size_t)nbytes);
    Py_END_ALLOW_THREADS
    return PyLong_FromSize_t(done);
}

static PyObject *py_keep_threads_awake(PyObject *self, PyObject *args) {
    (void)self;
    double seconds;
    if (!PyArg_ParseTuple(args, "d:keep_threads_awake", &seconds)) return NULL;
    fd_pool_keep_awake(seconds);
    Py_RETURN_NONE;
}

static PyObject *py_fp8_nan_free(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long address, nbytes;
    if (!PyArg_ParseTuple(args, "KK:fp8_nan_free", &address, &nbytes)) return NULL;
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = fd_fp8_nan_free((const uint8_t *)(uintptr_t)address, (size_t)nbytes);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(ok);
}

static PyObject *py_index_scores(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long q, w, keys, row_scale, out, key_stride, out_stride;
    int S, H, D, kind, threads;
    long long T;
    const char *isa;
    if (!PyArg_ParseTuple(args, "KKiiiiKKKLKKis:index_scores", &q, &w, &S, &H, &D, &kind, &keys,
                          &key_stride, &row_scale, &T, &out, &out_stride, &threads, &isa))
        return NULL;
    const fd_quant_kernels *kern = kernels_for(isa);
    if (!kern) return NULL;
    char err[160] = {0};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fd_index_scores(kern, threads, (const float *)(uintptr_t)q, (const float *)(uintptr_t)w,
                         S, H, D, kind, (const void *)(uintptr_t)keys, (size_t)key_stride,
                         (const float *)(uintptr_t)row_scale, (long)T, (float *)(uintptr_t)out,
                         (size_t)out_stride, err, sizeof err);
    Py_END_ALLOW_THREADS
    return kernel_result(rc, err);
}

static PyObject *py_sink_attention(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long q, sink, out;
    float scale;
    int H, D, threads;
    PyObject *spec;
    const char *isa;
    if (!PyArg_ParseTuple(args, "KfKiiOKis:sink_attention", &q, &scale, &sink, &H, &D, &spec,
                          &out, &threads, &isa))
        return NULL;
    PyObject *seq = PySequence_Fast(spec, "sink_attention: sets must be a sequence");
    if (!seq) return NULL;
    fd_row_set sets[4];
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n < 1 || n > 4) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "sink_attention: 1 to 4 row sets");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long rows, stride, exps = 0, rope = 0;
        long long count;
        int kind, nope = 0;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "KiKL|KKi", &rows, &kind, &stride,
                              &count, &exps, &rope, &nope)) {
            Py_DECREF(seq);
            return NULL;
        }
        sets[i] = (fd_row_set){(const void *)(uintptr_t)rows, kind, (size_t)stride, (long)count,
                               (const uint8_t *)(uintptr_t)exps, (const uint16_t *)(uintptr_t)rope,
                               nope};
    }
    Py_DECREF(seq);
    const fd_quant_kernels *kern = kernels_for(isa);
    if (!kern) return NULL;
    char err[160] = {0};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fd_sink_attention(kern, threads, (const float *)(uintptr_t)q, scale,
                           (const float *)(uintptr_t)sink, H, D, sets, (int)n,
                           (float *)(uintptr_t)out, err, sizeof err);
    Py_END_ALLOW_THREADS
    return kernel_result(rc, err);
}

static PyObject *py_sinkhorn(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long address;
    long count;
    int n, iters;
    float eps;
    if (!PyArg_ParseTuple(args, "Kliif:sinkhorn", &address, &count, &n, &iters, &eps)) return NULL;
    if (count < 0 || n < 1 || iters < 1) {
        PyErr_SetString(PyExc_ValueError, "sinkhorn: count >= 0, n >= 1 and iters >= 1 needed");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    fd_sinkhorn((float *)(uintptr_t)address, count, n, iters, eps);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_hc_pre(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long x, fn, scale, base, u, post, comb;
    int x_bf16, S, hc, D, iters;
    float hc_eps, norm_eps;
    if (!PyArg_ParseTuple(args, "KpiiiKKKiffKKK:hc_pre", &x, &x_bf16, &S, &hc, &D, &fn, &scale,
                          &base, &iters, &hc_eps, &norm_eps, &u, &post, &comb))
        return NULL;
    if (S < 0 || hc < 1 || hc > 16 || D < 1 || iters < 1) {
        PyErr_SetString(PyExc_ValueError, "hc_pre: S >= 0, 1 <= hc <= 16, D >= 1, iters >= 1");
        return NULL;
    }
    float *work =
        (float *)malloc(sizeof(float) * ((size_t)(hc + 1) * D + (size_t)hc * (2 + hc)));
    if (!work) return PyErr_NoMemory();
    const fd_quant_kernels *kern = fd_kernels_active();
    Py_BEGIN_ALLOW_THREADS
    fd_hc_pre(kern, (const void *)(uintptr_t)x, x_bf16, S, hc, D, (const float *)(uintptr_t)fn,
              (const float *)(uintptr_t)scale, (const float *)(uintptr_t)base, iters, hc_eps,
              norm_eps, (void *)(uintptr_t)u, (float *)(uintptr_t)post, (float *)(uintptr_t)comb,
              work);
    Py_END_ALLOW_THREADS
    free(work);
    Py_RETURN_NONE;
}

static PyObject *py_hc_post(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long f, add, x, post, comb, out;
    int f_bf16, add_n, x_bf16, S, hc, D;
    if (!PyArg_ParseTuple(args, "KpKiKpiiiKKK:hc_post", &f, &f_bf16, &add, &add_n, &x, &x_bf16,
                          &S, &hc, &D, &post, &comb, &out))
        return NULL;
    if (S < 0 || hc < 1 || hc > 16 || D < 1 || add_n < 0) {
        PyErr_SetString(PyExc_ValueError, "hc_post: S >= 0, 1 <= hc <= 16, D >= 1, add_n >= 0");
        return NULL;
    }
    float *work = (float *)malloc(sizeof(float) * 3 * (size_t)D);
    if (!work) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    fd_hc_post((const void *)(uintptr_t)f, f_bf16, (const float *)(uintptr_t)add, add_n,
               (const void *)(uintptr_t)x, x_bf16, S, hc, D, (const float *)(uintptr_t)post,
               (const float *)(uintptr_t)comb, (void *)(uintptr_t)out, work);
    Py_END_ALLOW_THREADS
    free(work);
    Py_RETURN_NONE;
}

static PyObject *py_rope(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long x, cos, sin, out;
    int x_bf16, S, H, d, rope_dim, inverse, out_bf16;
    if (!PyArg_ParseTuple(args, "KpiiiiKKpKp:rope", &x, &x_bf16, &S, &H, &d, &rope_dim, &cos,
                          &sin, &inverse, &out, &out_bf16))
        return NULL;
    if (S < 0 || H < 1 || rope_dim < 0 || rope_dim % 2 || rope_dim > d) {
        PyErr_SetString(PyExc_ValueError, "rope: S >= 0, H >= 1, 0 <= rope_dim <= d, rope_dim even");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    fd_rope((const void *)(uintptr_t)x, x_bf16, S, H, d, rope_dim, (const float *)(uintptr_t)cos,
            (const float *)(uintptr_t)sin, inverse, (void *)(uintptr_t)out, out_bf16);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_rms_norm(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long x, weight, out;
    int bf16, n;
    long rows;
    float eps;
    if (!PyArg_ParseTuple(args, "KpliKfK:rms_norm", &x, &bf16, &rows, &n, &weight, &eps, &out))
        return NULL;
    if (rows < 0 || n < 1) {
        PyErr_SetString(PyExc_ValueError, "rms_norm: rows >= 0 and n >= 1 needed");
        return NULL;
    }
    float *work = (float *)malloc(sizeof(float) * (size_t)n);
    if (!work) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    fd_rms_norm((const void *)(uintptr_t)x, bf16, rows, n, (const float *)(uintptr_t)weight, eps,
                (void *)(uintptr_t)out, work);
    Py_END_ALLOW_THREADS
    free(work);
    Py_RETURN_NONE;
}

static PyMethodDef kernel_methods[] = {
    {"rms_norm", py_rms_norm, METH_VARARGS,
     "rms_norm(x, bf16, rows, n, weight, eps, out)\n\nRaw addresses (weight 0: none); use "
     "flashdesk.engine.model.common.rms_norm."},
    {"rope", py_rope, METH_VARARGS,
     "rope(x, x_bf16, S, H, d, rope_dim, cos, sin, inverse, out, out_bf16)\n\nRaw addresses; "
     "use flashdesk.engine.model.rope.apply_rope."},
    {"hc_pre", py_hc_pre, METH_VARARGS,
     "hc_pre(x, x_bf16, S, hc, D, fn, scale, base, iters, hc_eps, norm_eps, u, post, comb)\n\n"
     "Raw addresses; use flashdesk.engine.model.mhc.hc_pre."},
    {"hc_post", py_hc_post, METH_VARARGS,
     "hc_post(f, f_bf16, add, add_n, x, x_bf16, S, hc, D, post, comb, out)\n\nRaw addresses "
     "(add 0: none); use flashdesk.engine.model.mhc.hc_post."},
    {"sink_attention", py_sink_attention, METH_VARARGS,
     "sink_attention(q, scale, sink, H, D, sets, out, threads, isa)\n\nRaw addresses: one "
     "query's sink attention over row sets ((address, kind 0 f32 / 1 bf16 / 2 packed FP8, stride, "
     "count[, exps, rope, nope]), ...) into out [H, D]; releases the GIL."},
    {"index_scores", py_index_scores, METH_VARARGS,
     "index_scores(q, w, S, H, D, kind, keys, key_stride, row_scale, T, out, out_stride, threads, "
     "isa)\n\nRaw addresses: lightning-indexer scores into out [S, T] (kinds: 0 f32, 1 bf16, 2 "
     "E4M3 times row_scale [T]); releases the GIL."},
    {"sinkhorn", py_sinkhorn, METH_VARARGS,
     "sinkhorn(address, count, n, iters, eps)\n\nSinkhorn-normalise count float32 [n, n] "
     "matrices in place; use flashdesk.engine.model.mhc.sinkhorn."},
    {"fp8_nan_free", py_fp8_nan_free, METH_VARARGS,
     "fp8_nan_free(address, nbytes) -> bool\n\nTrue if no byte of the E4M3 range is a NaN code."},
    {"keep_threads_awake", py_keep_threads_awake, METH_VARARGS,
     "keep_threads_awake(seconds)\n\nWake the kernels' sleeping pool workers and keep them "
     "spinning for up to `seconds` (at most 1) so that a job expected soon starts on all of them."},
    {"prefetch_pages", py_prefetch_pages, METH_VARARGS,
     "prefetch_pages(address, nbytes) -> int\n\nAsk the OS to read the range's pages in soon "
     "(memory-mapped weights); pages already resident are skipped. Returns the bytes advised "
     "(0: all resident, or not supported)."},
    {"advise_hugepages", py_advise_hugepages, METH_VARARGS,
     "advise_hugepages(address, nbytes) -> int\n\nAsk for transparent huge pages over the 2 MiB-"
     "aligned interior of the range (Linux; call before first touch). Returns the bytes advised."},
    {"cpu_features", py_cpu_features, METH_NOARGS,
     "cpu_features() -> dict\n\nSIMD features this CPU and OS can execute, and the logical core "
     "count. The kernels choose their variant from these."},
    {"read_bandwidth", (PyCFunction)(void (*)(void))py_read_bandwidth,
     METH_VARARGS | METH_KEYWORDS,
     "read_bandwidth(nbytes, threads=0, min_seconds=0.2, details=False) -> float | dict\n\n"
     "Best memory read bandwidth in GB/s (1e9 B/s) streaming an nbytes buffer with `threads` "
     "threads (0: all logical cores). Use a buffer several times the last-level cache. With "
     "details=True returns best/mean GB/s, passes and seconds."},
    {"isa_paths", py_isa_paths, METH_VARARGS,
     "isa_paths(name) -> dict[str, bool]\n\nWhich optional paths a variant that runs here has: "
     "'fp4_bf16', 'fp4_int8', 'fp8_bf16', 'gemm_bf16'."},
    {"isa_variants", py_isa_variants, METH_NOARGS,
     "isa_variants() -> dict[str, bool]\n\nKernel variants compiled into this build, mapped to "
     "whether they run on this CPU."},
    {"active_isa", py_active_isa, METH_NOARGS,
     "active_isa() -> str\n\nThe kernel variant calls use unless they name one."},
    {"set_isa", py_set_isa, METH_VARARGS,
     "set_isa(name) -> str\n\nForce a variant for all later calls ('auto': the best this CPU "
     "runs). ValueError if unknown or not supported here."},
    {"expert_ffn", py_expert_ffn, METH_VARARGS,
     "expert_ffn(x, x_bf16, T, D, I, table, n_experts, ids, weights, k, limit, out, out_bf16, "
     "threads, isa, int8=False)\n\nRaw FP4 expert FFN on addresses; use flashdesk.engine.kernels.expert_ffn."},
    {"fp8_decode_rows", py_fp8_decode_rows, METH_VARARGS,
     "fp8_decode_rows(w, scale, K, first, n, out, threads, isa)\n\nFP8 weight rows first.. "
     "first+n-1 decoded to fp32 on addresses; use flashdesk.engine.kernels.BoundLinear."},
    {"quant_linear", py_quant_linear, METH_VARARGS,
     "quant_linear(kind, x, x_bf16, M, groups, K, w, scale, N, out, out_bf16, threads, isa)\n\nRaw "
     "FP4/FP8/BF16 linear on addresses; use flashdesk.engine.kernels.fp8_linear / fp4_linear / "
     "bf16_linear."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef kernels_module = {
    PyModuleDef_HEAD_INIT, "_kernels",
    "FlashDesk C kernels: CPU feature detection, memory bandwidth, expert FFN kernels.", -1,
    kernel_methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__kernels(void) {
    fd_get_cpu_features(); /* detect once, while the import holds the GIL */
    fd_quant_tables_init(); /* the decode tables and the variant tables built from others */
    return PyModule_Create(&kernels_module);
}
