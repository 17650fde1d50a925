/* Avro binary in C: pipeline.codec's accelerator.
 *
 * decode(program, data, pos) -> (value, end)
 * encode(program, value, prefix) -> bytes
 *
 * ``program`` is the schema compiled by pipeline.codec.program() into nested tuples
 * (opcode, argument...), so all schema handling stays in Python and this file only walks
 * bytes. Values are what fastavro reads and writes for the same schema with logical
 * types stripped: dicts for records, lists for arrays, str, bytes, int, float, bool,
 * None. Bad bytes raise ValueError; a value that does not fit its schema raises
 * TypeError or ValueError naming the field; serde wraps both in SerdeError.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
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
        if (*count == LLONG_MIN) {  /* -LLONG_MIN overflows: undefined behaviour */
            PyErr_SetString(PyExc_ValueError, "block count out of range");
            return -1;
        }
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
        if (PyTuple_GET_SIZE(prog) > 1 && (v < INT32_MIN || v > INT32_MAX)) {
            /* an Avro int: a value no writer of this schema writes (nor encode() takes) */
            PyErr_Format(PyExc_ValueError, "int %lld out of the 32-bit range", v);
            return NULL;
        }
        return PyLong_FromLongLong(v);
    }
    case OP_FLOAT:
    case OP_DOUBLE: {
        Py_ssize_t size = op == OP_FLOAT ? 4 : 8;
        if (c->n - c->p < size)
            return truncated();
        const char *at = (const char *)c->d + c->p;
        double v = op == OP_FLOAT ? PyFloat_Unpack4(at, 1) : PyFloat_Unpack8(at, 1);
        c->p += size;
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


/* ------------------------------------------------------------------------ encoding */

#define MAX_PATH 16

typedef struct {
    char *buf;
    Py_ssize_t len, cap;
    int depth;
    struct {
        PyObject *name;  /* borrowed: a field name or map key; NULL for an array index */
        Py_ssize_t index;
    } path[MAX_PATH];
} Out;

static int out_reserve(Out *o, Py_ssize_t more) {
    if (o->len + more <= o->cap)
        return 0;
    Py_ssize_t cap = o->cap ? o->cap : 256;
    while (cap < o->len + more)
        cap *= 2;
    char *buf = PyMem_Realloc(o->buf, cap);
    if (buf == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    o->buf = buf;
    o->cap = cap;
    return 0;
}

static int out_bytes(Out *o, const char *data, Py_ssize_t n) {
    if (n == 0)  /* nothing to copy, and o->buf may still be NULL: memcpy(NULL, ...) is UB */
        return 0;
    if (out_reserve(o, n) < 0)
        return -1;
    memcpy(o->buf + o->len, data, n);
    o->len += n;
    return 0;
}

static int out_long(Out *o, long long v) {
    unsigned long long n = ((unsigned long long)v << 1) ^ (unsigned long long)(v >> 63);
    if (out_reserve(o, 10) < 0)
        return -1;
    while (n >= 0x80) {
        o->buf[o->len++] = (char)((n & 0x7f) | 0x80);
        n >>= 7;
    }
    o->buf[o->len++] = (char)n;
    return 0;
}

static int wrong_type(const char *expected, PyObject *value) {
    PyErr_Format(PyExc_TypeError, "expected %s, got %.80s %.80R", expected,
                 Py_TYPE(value)->tp_name, value);
    return -1;
}

/* Which union branch fastavro would pick for this value: the first whose type fits. */
static Py_ssize_t union_branch(PyObject *branches, PyObject *value) {
    Py_ssize_t count = PyTuple_GET_SIZE(branches);
    for (int pass = 0; pass < 2; pass++) {
        for (Py_ssize_t i = 0; i < count; i++) {
            long op = PyLong_AsLong(PyTuple_GET_ITEM(PyTuple_GET_ITEM(branches, i), 0));
            int fits = 0;
            if (value == Py_None)
                fits = op == OP_NULL;
            else if (PyBool_Check(value))
                fits = op == OP_BOOLEAN;
            else if (PyLong_Check(value))
                fits = op == OP_LONG || (pass == 1 && (op == OP_DOUBLE || op == OP_FLOAT));
            else if (PyFloat_Check(value))
                fits = op == OP_DOUBLE || op == OP_FLOAT;
            else if (PyUnicode_Check(value))
                fits = op == OP_STRING || (op == OP_ENUM && PySequence_Contains(
                    PyTuple_GET_ITEM(PyTuple_GET_ITEM(branches, i), 1), value) == 1);
            else if (PyBytes_Check(value) || PyByteArray_Check(value))
                fits = op == OP_BYTES || op == OP_FIXED;
            else if (PyDict_Check(value))
                fits = op == OP_RECORD || op == OP_MAP;
            else if (PyList_Check(value) || PyTuple_Check(value))
                fits = op == OP_ARRAY;
            if (fits)
                return i;
        }
    }
    return -1;
}

static int encode_value(PyObject *prog, PyObject *value, Out *o);

/* Encode one field (name) or item (index); on failure the path to it stays on o->path. */
static int encode_field(PyObject *prog, PyObject *value, Out *o, PyObject *name,
                        Py_ssize_t index) {
    if (o->depth < MAX_PATH) {
        o->path[o->depth].name = name;
        o->path[o->depth].index = index;
    }
    o->depth++;
    if (encode_value(prog, value, o) < 0)
        return -1;
    o->depth--;
    return 0;
}

static int encode_value(PyObject *prog, PyObject *value, Out *o) {
    long op = PyLong_AsLong(PyTuple_GET_ITEM(prog, 0));
    switch (op) {
    case OP_NULL:
        if (value != Py_None)
            return wrong_type("null", value);
        return 0;
    case OP_BOOLEAN: {
        int truth = PyObject_IsTrue(value);
        if (truth < 0 || out_reserve(o, 1) < 0)
            return -1;
        o->buf[o->len++] = (char)truth;
        return 0;
    }
    case OP_LONG: {
        if (!PyLong_Check(value) || PyBool_Check(value))
            return wrong_type("an int", value);
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (overflow) {
            PyErr_Format(PyExc_ValueError, "%R does not fit in a 64-bit long", value);
            return -1;
        }
        if (PyTuple_GET_SIZE(prog) > 1 && (v < INT32_MIN || v > INT32_MAX)) {
            PyErr_Format(PyExc_ValueError, "%R does not fit in a 32-bit int", value);
            return -1;
        }
        return out_long(o, v);
    }
    case OP_FLOAT:
    case OP_DOUBLE: {
        double v;
        if (PyFloat_Check(value))
            v = PyFloat_AS_DOUBLE(value);
        else if (PyLong_Check(value) && !PyBool_Check(value)) {
            v = PyLong_AsDouble(value);
            if (v == -1.0 && PyErr_Occurred())
                return -1;
        } else
            return wrong_type("a float", value);
        if (out_reserve(o, 8) < 0)
            return -1;
        if ((op == OP_FLOAT ? PyFloat_Pack4(v, o->buf + o->len, 1)
                            : PyFloat_Pack8(v, o->buf + o->len, 1)) < 0)
            return -1;
        o->len += op == OP_FLOAT ? 4 : 8;
        return 0;
    }
    case OP_BYTES: {
        char *data;
        Py_ssize_t n;
        if (PyBytes_Check(value)) {
            data = PyBytes_AS_STRING(value);
            n = PyBytes_GET_SIZE(value);
        } else if (PyByteArray_Check(value)) {
            data = PyByteArray_AS_STRING(value);
            n = PyByteArray_GET_SIZE(value);
        } else
            return wrong_type("bytes", value);
        return out_long(o, n) < 0 ? -1 : out_bytes(o, data, n);
    }
    case OP_STRING: {
        if (!PyUnicode_Check(value))
            return wrong_type("a str", value);
        Py_ssize_t n;
        const char *data = PyUnicode_AsUTF8AndSize(value, &n);
        if (data == NULL)
            return -1;
        return out_long(o, n) < 0 ? -1 : out_bytes(o, data, n);
    }
    case OP_RECORD: {
        if (!PyDict_Check(value))
            return wrong_type("a dict", value);
        PyObject *names = PyTuple_GET_ITEM(prog, 1), *fields = PyTuple_GET_ITEM(prog, 2);
        PyObject *defaults = PyTuple_GET_ITEM(prog, 3);
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(names); i++) {
            PyObject *name = PyTuple_GET_ITEM(names, i);
            PyObject *v = PyDict_GetItemWithError(value, name);
            if (v == NULL) {
                if (PyErr_Occurred())
                    return -1;
                v = PyTuple_GET_ITEM(defaults, i);  /* None when the schema has none */
            }
            if (encode_field(PyTuple_GET_ITEM(fields, i), v, o, name, 0) < 0)
                return -1;
        }
        return 0;
    }
    case OP_UNION: {
        PyObject *branches = PyTuple_GET_ITEM(prog, 1);
        Py_ssize_t i = union_branch(branches, value);
        if (i < 0) {
            if (PyErr_Occurred())
                return -1;
            return wrong_type("a value of one of the union's types", value);
        }
        return out_long(o, i) < 0 ? -1 : encode_value(PyTuple_GET_ITEM(branches, i), value, o);
    }
    case OP_ARRAY: {
        if (!PyList_Check(value) && !PyTuple_Check(value))
            return wrong_type("a list", value);
        PyObject *items = PyTuple_GET_ITEM(prog, 1);
        Py_ssize_t n = PySequence_Fast_GET_SIZE(value);
        if (n) {
            if (out_long(o, n) < 0)
                return -1;
            PyObject **seq = PySequence_Fast_ITEMS(value);
            for (Py_ssize_t i = 0; i < n; i++)
                if (encode_field(items, seq[i], o, NULL, i) < 0)
                    return -1;
        }
        return out_long(o, 0);
    }
    case OP_MAP: {
        if (!PyDict_Check(value))
            return wrong_type("a dict", value);
        PyObject *values = PyTuple_GET_ITEM(prog, 1), *k, *v;
        Py_ssize_t pos = 0, n = PyDict_GET_SIZE(value);
        if (n) {
            if (out_long(o, n) < 0)
                return -1;
            while (PyDict_Next(value, &pos, &k, &v)) {
                if (!PyUnicode_Check(k))
                    return wrong_type("str map keys", k);
                Py_ssize_t len;
                const char *data = PyUnicode_AsUTF8AndSize(k, &len);
                if (data == NULL || out_long(o, len) < 0 || out_bytes(o, data, len) < 0 ||
                    encode_field(values, v, o, k, 0) < 0)
                    return -1;
            }
        }
        return out_long(o, 0);
    }
    case OP_ENUM: {
        PyObject *symbols = PyTuple_GET_ITEM(prog, 1);
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(symbols); i++) {
            int eq = PyObject_RichCompareBool(PyTuple_GET_ITEM(symbols, i), value, Py_EQ);
            if (eq < 0)
                return -1;
            if (eq)
                return out_long(o, i);
        }
        PyErr_Format(PyExc_ValueError, "%R is not one of the enum's symbols %R", value,
                     symbols);
        return -1;
    }
    case OP_FIXED: {
        Py_ssize_t size = PyLong_AsSsize_t(PyTuple_GET_ITEM(prog, 1));
        if (!PyBytes_Check(value))
            return wrong_type("bytes", value);
        if (PyBytes_GET_SIZE(value) != size) {
            PyErr_Format(PyExc_ValueError, "fixed needs %zd bytes, got %zd", size,
                         PyBytes_GET_SIZE(value));
            return -1;
        }
        return out_bytes(o, PyBytes_AS_STRING(value), size);
    }
    default:
        PyErr_Format(PyExc_ValueError, "unknown opcode %ld", op);
        return -1;
    }
}

static PyObject *encode(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 3 || !PyTuple_Check(args[0]) || !PyBytes_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "encode(program: tuple, value, prefix: bytes)");
        return NULL;
    }
    Out o;
    o.buf = NULL;
    o.len = o.cap = 0;
    o.depth = 0;
    PyObject *result = NULL;
    if (out_bytes(&o, PyBytes_AS_STRING(args[2]), PyBytes_GET_SIZE(args[2])) == 0 &&
        encode_value(args[0], args[1], &o) == 0)
        result = PyBytes_FromStringAndSize(o.buf, o.len);
    PyMem_Free(o.buf);
    if (result == NULL && o.depth > 0 && PyErr_ExceptionMatches(PyExc_Exception)) {
        /* Name the field: "changes.2.price: expected a str, got float 1.5". */
        PyObject *type, *exc, *tb, *path = PyUnicode_FromString("");
        PyErr_Fetch(&type, &exc, &tb);
        for (int i = 0; i < o.depth && i < MAX_PATH && path != NULL; i++) {
            PyObject *part = o.path[i].name ? PyUnicode_FromFormat(i ? ".%S" : "%S", o.path[i].name)
                                            : PyUnicode_FromFormat(i ? ".%zd" : "%zd",
                                                                   o.path[i].index);
            PyObject *joined = part ? PyUnicode_Concat(path, part) : NULL;
            Py_XDECREF(part);
            Py_SETREF(path, joined);
        }
        if (path != NULL && exc != NULL) {
            PyObject *text = PyObject_Str(exc);
            if (text != NULL) {
                /* A UnicodeError cannot be made from one message: its base ValueError. */
                PyErr_Format(PyObject_IsSubclass(type, PyExc_UnicodeError) == 1
                             ? PyExc_ValueError : type, "%U: %U", path, text);
                Py_DECREF(text);
                Py_DECREF(path);
                Py_XDECREF(type);
                Py_XDECREF(exc);
                Py_XDECREF(tb);
                return NULL;
            }
        }
        Py_XDECREF(path);
        PyErr_Restore(type, exc, tb);
    }
    return result;
}

static PyMethodDef methods[] = {
    {"decode", (PyCFunction)(void (*)(void))decode, METH_FASTCALL,
     "decode(program, data, pos) -> (value, end): Avro binary by a compiled program."},
    {"encode", (PyCFunction)(void (*)(void))encode, METH_FASTCALL,
     "encode(program, value, prefix) -> prefix + the Avro binary of value."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "pipeline._avro",
                                    "Avro binary in C (see pipeline.codec).", -1,
                                    methods};

PyMODINIT_FUNC PyInit__avro(void) { return PyModule_Create(&module); }
