/* Avro binary decoding in C for replays: pipeline.fastdecode's accelerator.
 *
 * decode(program, data, pos) -> (value, end)
 *
 * ``program`` is the writer schema compiled by pipeline.fastdecode.program() into
 * nested tuples (opcode, argument...), so all schema handling stays in Python and this
 * file only walks bytes. Values are what fastavro returns for the same schema with
 * logical types stripped: dicts for records, lists for arrays, str, bytes, int, float,
 * bool, None. Bad bytes raise ValueError; the caller wraps it in SerdeError.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

enum { OP_NULL, OP_BOOLEAN, OP_LONG, OP_FLOAT, OP_DOUBLE, OP_BYTES, OP_STRING, OP_RECORD,
       OP_UNION, OP_ARRAY, OP_MAP, OP_ENUM, OP_FIXED };

typedef struct {
    const unsigned char *d;
    Py_ssize_t n;
    Py_ssize_t p;
} Cursor;

static PyObject *truncated(void) {
    PyErr_SetString(PyExc_ValueError, "truncated Avro data");
    return NULL;
}

/* A zigzag varint; returns 0 on success. */
static int read_long(Cursor *c, long long *out) {
    unsigned long long n = 0;
    int shift = 0;
    for (;;) {
        if (c->p >= c->n) {
            truncated();
            return -1;
        }
        unsigned char b = c->d[c->p++];
        n |= (unsigned long long)(b & 0x7f) << shift;
        if (b < 0x80)
            break;
        shift += 7;
        if (shift > 63) {
            PyErr_SetString(PyExc_ValueError, "varint longer than 10 bytes");
            return -1;
        }
    }
    *out = (long long)(n >> 1) ^ -(long long)(n & 1);
    return 0;
}

static int read_length(Cursor *c, Py_ssize_t *out) {
    long long n;
    if (read_long(c, &n) < 0)
        return -1;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "negative length");
        return -1;
    }
    if (n > c->n - c->p) {
        truncated();
        return -1;
    }
    *out = (Py_ssize_t)n;
    return 0;
}

static PyObject *decode_value(PyObject *prog, Cursor *c);

/* Array and map blocks: a count (negative: followed by the block's byte size), until 0. */
static int read_block_count(Cursor *c, long long *count) {
    if (read_long(c, count) < 0)
        return -1;
    if (*count < 0) {
        long long size;
        *count = -*count;
        if (read_long(c, &size) < 0)
            return -1;
    }
    return 0;
}

static PyObject *decode_value(PyObject *prog, Cursor *c) {
    long op = PyLong_AsLong(PyTuple_GET_ITEM(prog, 0));
    switch (op) {
    case OP_NULL:
        Py_RETURN_NONE;
    case OP_BOOLEAN:
        if (c->p >= c->n)
            return truncated();
        if (c->d[c->p++])
            Py_RETURN_TRUE;
        Py_RETURN_FALSE;
    case OP_LONG: {
        long long v;
        if (read_long(c, &v) < 0)
            return NULL;
        return PyLong_FromLongLong(v);
    }
    case OP_FLOAT: {
        if (c->n - c->p < 4)
            return truncated();
        double v = PyFloat_Unpack4((const char *)c->d + c->p, 1);
        c->p += 4;
        if (v == -1.0 && PyErr_Occurred())
            return NULL;
        return PyFloat_FromDouble(v);
    }
    case OP_DOUBLE: {
        if (c->n - c->p < 8)
            return truncated();
        double v = PyFloat_Unpack8((const char *)c->d + c->p, 1);
        c->p += 8;
        if (v == -1.0 && PyErr_Occurred())
            return NULL;
        return PyFloat_FromDouble(v);
    }
    case OP_BYTES: {
        Py_ssize_t len;
        if (read_length(c, &len) < 0)
            return NULL;
        PyObject *v = PyBytes_FromStringAndSize((const char *)c->d + c->p, len);
        c->p += len;
        return v;
    }
    case OP_STRING: {
        Py_ssize_t len;
        if (read_length(c, &len) < 0)
            return NULL;
        PyObject *v = PyUnicode_DecodeUTF8((const char *)c->d + c->p, len, NULL);
        c->p += len;
        return v;
    }
    case OP_RECORD: {
        PyObject *names = PyTuple_GET_ITEM(prog, 1), *fields = PyTuple_GET_ITEM(prog, 2);
        Py_ssize_t count = PyTuple_GET_SIZE(names);
        PyObject *record = PyDict_New();
        if (record == NULL)
            return NULL;
        for (Py_ssize_t i = 0; i < count; i++) {
            PyObject *v = decode_value(PyTuple_GET_ITEM(fields, i), c);
            if (v == NULL || PyDict_SetItem(record, PyTuple_GET_ITEM(names, i), v) < 0) {
                Py_XDECREF(v);
                Py_DECREF(record);
                return NULL;
            }
            Py_DECREF(v);
        }
        return record;
    }
    case OP_UNION: {
        PyObject *branches = PyTuple_GET_ITEM(prog, 1);
        long long index;
        if (read_long(c, &index) < 0)
            return NULL;
        if (index < 0 || index >= PyTuple_GET_SIZE(branches)) {
            PyErr_Format(PyExc_ValueError, "union branch %lld out of range", index);
            return NULL;
        }
        return decode_value(PyTuple_GET_ITEM(branches, (Py_ssize_t)index), c);
    }
    case OP_ARRAY: {
        PyObject *items = PyTuple_GET_ITEM(prog, 1);
        PyObject *list = PyList_New(0);
        long long count;
        if (list == NULL)
            return NULL;
        for (;;) {
            if (read_block_count(c, &count) < 0)
                goto array_fail;
            if (count == 0)
                return list;
            if (count > c->n - c->p && PyLong_AsLong(PyTuple_GET_ITEM(items, 0)) != OP_NULL) {
                /* every item but a null takes at least one byte */
                PyErr_SetString(PyExc_ValueError, "array block longer than the data");
                goto array_fail;
            }
            for (long long i = 0; i < count; i++) {
                PyObject *v = decode_value(items, c);
                if (v == NULL || PyList_Append(list, v) < 0) {
                    Py_XDECREF(v);
                    goto array_fail;
                }
                Py_DECREF(v);
            }
        }
    array_fail:
        Py_DECREF(list);
        return NULL;
    }
    case OP_MAP: {
        PyObject *values = PyTuple_GET_ITEM(prog, 1);
        PyObject *map = PyDict_New();
        long long count;
        if (map == NULL)
            return NULL;
        for (;;) {
            if (read_block_count(c, &count) < 0)
                goto map_fail;
            if (count == 0)
                return map;
            for (long long i = 0; i < count; i++) {
                Py_ssize_t len;
                if (read_length(c, &len) < 0)
                    goto map_fail;
                PyObject *k = PyUnicode_DecodeUTF8((const char *)c->d + c->p, len, NULL);
                c->p += len;
                if (k == NULL)
                    goto map_fail;
                PyObject *v = decode_value(values, c);
                if (v == NULL || PyDict_SetItem(map, k, v) < 0) {
                    Py_DECREF(k);
                    Py_XDECREF(v);
                    goto map_fail;
                }
                Py_DECREF(k);
                Py_DECREF(v);
            }
        }
    map_fail:
        Py_DECREF(map);
        return NULL;
    }
    case OP_ENUM: {
        PyObject *symbols = PyTuple_GET_ITEM(prog, 1);
        long long index;
        if (read_long(c, &index) < 0)
            return NULL;
        if (index < 0 || index >= PyTuple_GET_SIZE(symbols)) {
            PyErr_Format(PyExc_ValueError, "enum index %lld out of range", index);
            return NULL;
        }
        PyObject *v = PyTuple_GET_ITEM(symbols, (Py_ssize_t)index);
        Py_INCREF(v);
        return v;
    }
    case OP_FIXED: {
        Py_ssize_t size = PyLong_AsSsize_t(PyTuple_GET_ITEM(prog, 1));
        if (c->n - c->p < size)
            return truncated();
        PyObject *v = PyBytes_FromStringAndSize((const char *)c->d + c->p, size);
        c->p += size;
        return v;
    }
    default:
        PyErr_Format(PyExc_ValueError, "unknown opcode %ld", op);
        return NULL;
    }
}

static PyObject *decode(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 3 || !PyTuple_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "decode(program: tuple, data: bytes, pos: int)");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t pos = PyLong_AsSsize_t(args[2]);
    if (pos == -1 && PyErr_Occurred()) {
        PyBuffer_Release(&view);
        return NULL;
    }
    if (pos < 0 || pos > view.len) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "pos outside the data");
        return NULL;
    }
    Cursor c = {(const unsigned char *)view.buf, view.len, pos};
    PyObject *value = decode_value(args[0], &c);
    PyBuffer_Release(&view);
    if (value == NULL)
        return NULL;
    PyObject *end = PyLong_FromSsize_t(c.p);
    if (end == NULL) {
        Py_DECREF(value);
        return NULL;
    }
    PyObject *result = PyTuple_Pack(2, value, end);
    Py_DECREF(value);
    Py_DECREF(end);
    return result;
}

static PyMethodDef methods[] = {
    {"decode", (PyCFunction)(void (*)(void))decode, METH_FASTCALL,
     "decode(program, data, pos) -> (value, end): Avro binary by a compiled program."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "pipeline._avro",
                                    "Avro binary decoding in C (see pipeline.fastdecode).", -1,
                                    methods};

PyMODINIT_FUNC PyInit__avro(void) { return PyModule_Create(&module); }
