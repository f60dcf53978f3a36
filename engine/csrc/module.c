/* flashdesk.engine._kernels: the Python face of the C kernels.
 *
 * Every entry point that does real work releases the GIL, so the app's UI thread and the engine's
 * other threads keep running while a kernel streams memory.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "bandwidth.h"
#include "cpu_features.h"

static PyObject *py_cpu_features(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
    const fd_cpu_features *f;
    Py_BEGIN_ALLOW_THREADS
    f = fd_get_cpu_features();
    Py_END_ALLOW_THREADS
    return Py_BuildValue(
        "{s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:i}",
        "sse4_2", f->sse42 ? Py_True : Py_False,
        "avx", f->avx ? Py_True : Py_False,
        "avx2", f->avx2 ? Py_True : Py_False,
        "fma", f->fma ? Py_True : Py_False,
        "f16c", f->f16c ? Py_True : Py_False,
        "avx512f", f->avx512f ? Py_True : Py_False,
        "avx512bw", f->avx512bw ? Py_True : Py_False,
        "avx512vl", f->avx512vl ? Py_True : Py_False,
        "avx512dq", f->avx512dq ? Py_True : Py_False,
        "avx512_vnni", f->avx512_vnni ? Py_True : Py_False,
        "avx512_bf16", f->avx512_bf16 ? Py_True : Py_False,
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

static PyMethodDef kernel_methods[] = {
    {"cpu_features", py_cpu_features, METH_NOARGS,
     "cpu_features() -> dict\n\nSIMD features this CPU and OS can execute, and the logical core "
     "count. The kernels choose their variant from these."},
    {"read_bandwidth", (PyCFunction)(void (*)(void))py_read_bandwidth,
     METH_VARARGS | METH_KEYWORDS,
     "read_bandwidth(nbytes, threads=0, min_seconds=0.2, details=False) -> float | dict\n\n"
     "Best memory read bandwidth in GB/s (1e9 B/s) streaming an nbytes buffer with `threads` "
     "threads (0: all logical cores). Use a buffer several times the last-level cache. With "
     "details=True returns best/mean GB/s, passes and seconds."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef kernels_module = {
    PyModuleDef_HEAD_INIT, "_kernels",
    "FlashDesk C kernels: CPU feature detection, memory bandwidth, expert FFN kernels.", -1,
    kernel_methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__kernels(void) {
    fd_get_cpu_features(); /* detect once, while the import holds the GIL */
    return PyModule_Create(&kernels_module);
}
