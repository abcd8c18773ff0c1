/* The frame walk of wsrelay/walk.py in C: identical behaviour, a fraction of the cost per frame.
 *
 * walk.py's docstring is the contract; the tests run this Walker and walk.PyWalker over the same streams and
 * compare every result.  Nothing here touches a socket or copies a payload: a client text message's first bytes
 * are unmasked into a stack buffer to look for a request, an upstream text message's first bytes are read in
 * place to see its type.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

#define NEED_MORE 0
#define CONTROL 1
#define TEXT 2
#define ERROR 3

/* Keep in step with wsrelay/sniff.py. */
#define SNIFF_CLIENT_BYTES 256
#define SNIFF_UPSTREAM_BYTES 96

typedef struct {
    PyObject_HEAD
    char client;
    unsigned long long limit;
    PyObject *terminal;          /* frozenset of bytes */
    unsigned long long remaining;
    char frame_fin;
    char in_message;
    unsigned long long message_size;
    Py_ssize_t frames;
    Py_ssize_t data_frames;
} Walker;

static const unsigned char *
find(const unsigned char *hay, Py_ssize_t n, const char *needle, Py_ssize_t m)
{
    Py_ssize_t i;
    if (m > n)
        return NULL;
    for (i = 0; i + m <= n; i++) {
        if (hay[i] == (unsigned char)needle[0] && memcmp(hay + i, needle, (size_t)m) == 0)
            return hay + i;
    }
    return NULL;
}

static int
is_json_space(unsigned char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

/* 1: the message plainly is none the ledger reads; 0: it may be one (the frame stream looks); -1: error. */
static int
plainly_not_terminal(Walker *self, const unsigned char *p, Py_ssize_t n)
{
    static const char key[] = "\"type\"";
    Py_ssize_t i = 0, value;
    PyObject *type;
    int found;

    while (i < n && is_json_space(p[i])) i++;
    if (i >= n || p[i] != '{') return 0;
    i++;
    while (i < n && is_json_space(p[i])) i++;
    if (n - i < (Py_ssize_t)(sizeof(key) - 1) || memcmp(p + i, key, sizeof(key) - 1) != 0) return 0;
    i += sizeof(key) - 1;
    while (i < n && is_json_space(p[i])) i++;
    if (i >= n || p[i] != ':') return 0;
    i++;
    while (i < n && is_json_space(p[i])) i++;
    if (i >= n || p[i] != '"') return 0;
    value = ++i;
    while (i < n && p[i] != '"') {
        if (p[i] == '\\') return 0;
        i++;
    }
    if (i >= n) return 0;
    type = PyBytes_FromStringAndSize((const char *)p + value, i - value);
    if (type == NULL) return -1;
    found = PySet_Contains(self->terminal, type);
    Py_DECREF(type);
    if (found < 0) return -1;
    return !found;
}

/* 1: a client text message's first bytes (masked) look like a request, or may be one; 0: not. */
static int
may_be_request(const unsigned char *masked, Py_ssize_t n, const unsigned char *mask_key, int longer)
{
    unsigned char prefix[SNIFF_CLIENT_BYTES];
    Py_ssize_t i;
    for (i = 0; i < n; i++)
        prefix[i] = masked[i] ^ mask_key[i & 3];
    if (find(prefix, n, "\"response.create\"", 17))
        return 1;
    return longer && !find(prefix, n, "\"type\"", 6);
}

static PyObject *
result(Py_ssize_t pos, int event)
{
    return Py_BuildValue("(ni)", pos, event);
}

static PyObject *
Walker_walk(Walker *self, PyObject *args)
{
    PyObject *obj;
    Py_buffer view;
    Py_ssize_t pos, end;
    const unsigned char *buf;
    int event = NEED_MORE;

    if (!PyArg_ParseTuple(args, "Onn:walk", &obj, &pos, &end))
        return NULL;
    if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (pos < 0 || end < pos || end > view.len) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "walk: pos and end must satisfy 0 <= pos <= end <= len(buf)");
        return NULL;
    }
    buf = (const unsigned char *)view.buf;

    for (;;) {
        unsigned char b0, b1, opcode;
        unsigned long long length, size = 0;
        Py_ssize_t header_length, avail;
        int fin;

        if (self->remaining) {
            avail = end - pos;
            if (self->remaining >= (unsigned long long)avail) {
                self->remaining -= (unsigned long long)avail;
                pos = end;
                event = NEED_MORE;
                break;
            }
            pos += (Py_ssize_t)self->remaining;
            self->remaining = 0;
        }
        avail = end - pos;
        if (avail < 2) { event = NEED_MORE; break; }
        b0 = buf[pos];
        b1 = buf[pos + 1];
        opcode = b0 & 0x0F;
        if (opcode >= 0x8) { event = CONTROL; break; }
        if ((b0 & 0x70) || opcode > 0x2 || ((b1 & 0x80) != 0) != (self->client != 0)) { event = ERROR; break; }
        length = b1 & 0x7F;
        header_length = 2;
        if (length == 126) {
            header_length = 4;
            if (avail < 4) { event = NEED_MORE; break; }
            length = ((unsigned long long)buf[pos + 2] << 8) | buf[pos + 3];
        } else if (length == 127) {
            int k;
            header_length = 10;
            if (avail < 10) { event = NEED_MORE; break; }
            length = 0;
            for (k = 2; k < 10; k++)
                length = (length << 8) | buf[pos + k];
            if (length >> 63) { event = ERROR; break; }
        }
        if ((opcode == 0x0) != (self->in_message != 0)) { event = ERROR; break; }
        fin = (b0 & 0x80) != 0;
        if (self->client) {
            if (avail < header_length + 4) { event = NEED_MORE; break; }
            size = opcode == 0x0 ? self->message_size + length : length;
            if (size > self->limit) { event = ERROR; break; }
            if (opcode == 0x1 && length) {
                Py_ssize_t start = pos + header_length + 4;
                Py_ssize_t wanted = length < SNIFF_CLIENT_BYTES ? (Py_ssize_t)length : SNIFF_CLIENT_BYTES;
                if (wanted > end - start) { event = TEXT; break; }
                if (may_be_request(buf + start, wanted, buf + start - 4,
                                   length > (unsigned long long)wanted || !fin)) {
                    event = TEXT;
                    break;
                }
            }
            header_length += 4;
            self->message_size = size;
        } else if (opcode == 0x1) {
            Py_ssize_t start = pos + header_length;
            int plain;
            if (!fin || length > (unsigned long long)(end - start)) { event = TEXT; break; }
            plain = plainly_not_terminal(self, buf + start,
                                         length < SNIFF_UPSTREAM_BYTES ? (Py_ssize_t)length : SNIFF_UPSTREAM_BYTES);
            if (plain < 0) {
                PyBuffer_Release(&view);
                return NULL;
            }
            if (!plain) { event = TEXT; break; }
        }
        self->frames++;
        self->data_frames++;
        self->in_message = !fin;
        self->frame_fin = (char)fin;
        pos += header_length;
        self->remaining = length;
    }
    PyBuffer_Release(&view);
    return result(pos, event);
}

static int
Walker_init(Walker *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"client", "limit", "terminal", NULL};
    int client;
    unsigned long long limit = 0;
    PyObject *terminal = NULL, *set;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "p|KO:Walker", kwlist, &client, &limit, &terminal))
        return -1;
    set = PyFrozenSet_New(terminal);  /* NULL terminal: an empty set */
    if (set == NULL)
        return -1;
    Py_XSETREF(self->terminal, set);
    self->client = (char)client;
    self->limit = limit;
    self->remaining = 0;
    self->frame_fin = 1;
    self->in_message = 0;
    self->message_size = 0;
    self->frames = 0;
    self->data_frames = 0;
    return 0;
}

static void
Walker_dealloc(Walker *self)
{
    Py_XDECREF(self->terminal);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Walker_get_terminal(Walker *self, void *closure)
{
    Py_INCREF(self->terminal);
    return self->terminal;
}

static PyMemberDef Walker_members[] = {
    {"client", T_BOOL, offsetof(Walker, client), READONLY, NULL},
    {"limit", T_ULONGLONG, offsetof(Walker, limit), 0, NULL},
    {"remaining", T_ULONGLONG, offsetof(Walker, remaining), 0, NULL},
    {"frame_fin", T_BOOL, offsetof(Walker, frame_fin), 0, NULL},
    {"in_message", T_BOOL, offsetof(Walker, in_message), 0, NULL},
    {"message_size", T_ULONGLONG, offsetof(Walker, message_size), 0, NULL},
    {"frames", T_PYSSIZET, offsetof(Walker, frames), 0, NULL},
    {"data_frames", T_PYSSIZET, offsetof(Walker, data_frames), 0, NULL},
    {NULL}
};

static PyGetSetDef Walker_getset[] = {
    {"terminal", (getter)Walker_get_terminal, NULL, NULL, NULL},
    {NULL}
};

static PyMethodDef Walker_methods[] = {
    {"walk", (PyCFunction)Walker_walk, METH_VARARGS,
     "walk(buf, pos, end) -> (pos, event): see wsrelay.walk."},
    {NULL}
};

static PyTypeObject WalkerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "wsrelay._speedups.Walker",
    .tp_doc = "One direction's frame walk; see wsrelay.walk.",
    .tp_basicsize = sizeof(Walker),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Walker_init,
    .tp_dealloc = (destructor)Walker_dealloc,
    .tp_members = Walker_members,
    .tp_getset = Walker_getset,
    .tp_methods = Walker_methods,
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "wsrelay._speedups",
    .m_doc = "C implementation of wsrelay.walk.Walker.",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    PyObject *module;
    if (PyType_Ready(&WalkerType) < 0)
        return NULL;
    module = PyModule_Create(&speedups_module);
    if (module == NULL)
        return NULL;
    Py_INCREF(&WalkerType);
    if (PyModule_AddObject(module, "Walker", (PyObject *)&WalkerType) < 0) {
        Py_DECREF(&WalkerType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
