/* Native helpers for lmssl's tokenizer stage: counting space-separated chunks of a corpus and
 * learning BPE merges from word counts.
 *
 * ChunkCounter splits every text before each space that follows a non-whitespace character (so
 * "a  b" gives "a" and "  b", while "a\t  b" stays whole) and counts the distinct chunks. For the
 * normalizers and pre-tokenizers lmssl allows on this path, a text's pre-tokens are the union of its
 * chunks' pre-tokens, so the Python side pre-tokenizes each distinct chunk once instead of every
 * occurrence.
 *
 * train_bpe() is the BPE training algorithm of Sennrich et al. (2016) on weighted words, with the
 * conventions of the `tokenizers` library's BpeTrainer (special tokens first, then the alphabet
 * sorted by code point, then one token per merge; ties go to the smaller pair of ids;
 * continuing-subword prefix and end-of-word suffix) so the result drops into models.BPE.
 * It is deterministic: no step depends on hash-table order.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* byte-string hash table (chunk -> count)                                                       */

typedef struct {
    uint64_t hash;
    int64_t count;
    uint32_t offset; /* into the arena */
    uint32_t length;
} Slot;

typedef struct { /* byte string -> count, open addressing */
    Slot *slots;
    size_t capacity, used; /* capacity: a power of two */
    char *arena;
    size_t arena_used, arena_cap;
} Table;

enum { MODE_CHUNKS, MODE_METASPACE, MODE_BYTE_LEVEL, MODE_BERT };

typedef struct {
    PyObject_HEAD
    Table words;  /* pre-tokens of the chunks this module splits itself */
    Table chunks; /* chunks left to the caller (non-ASCII text under a normalizer, or MODE_CHUNKS) */
    int mode, prepend, lowercase, add_prefix_space, clean_text, any_text;
    char replacement[8];
    size_t replacement_len;
    char *buffer; /* scratch for one chunk's transformed text */
    size_t buffer_cap;
    int64_t texts, bytes;
    int64_t weight; /* count of the chunk being split into words */
} ChunkCounter;

static uint64_t hash_bytes(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ULL; /* FNV-1a, then a final mix */
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ULL;
    }
    h ^= h >> 29;
    h *= 0xbf58476d1ce4e5b9ULL;
    h ^= h >> 32;
    return h | 1; /* 0 marks an empty slot */
}

static int table_grow(Table *t) {
    size_t capacity = t->capacity ? t->capacity * 2 : 1 << 14;
    Slot *slots = calloc(capacity, sizeof(Slot));
    if (!slots) return -1;
    for (size_t i = 0; i < t->capacity; i++) {
        Slot *old = &t->slots[i];
        if (!old->hash) continue;
        size_t j = old->hash & (capacity - 1);
        while (slots[j].hash) j = (j + 1) & (capacity - 1);
        slots[j] = *old;
    }
    free(t->slots);
    t->slots = slots;
    t->capacity = capacity;
    return 0;
}

static int table_add(Table *t, const char *s, size_t n, int64_t count) {
    if (!n) return 0;
    if ((t->used + 1) * 2 > t->capacity && table_grow(t) < 0) return -1;
    uint64_t h = hash_bytes(s, n);
    size_t j = h & (t->capacity - 1);
    for (;;) {
        Slot *slot = &t->slots[j];
        if (!slot->hash) break;
        if (slot->hash == h && slot->length == n && memcmp(t->arena + slot->offset, s, n) == 0) {
            slot->count += count;
            return 0;
        }
        j = (j + 1) & (t->capacity - 1);
    }
    if (t->arena_used + n > t->arena_cap) {
        size_t cap = t->arena_cap ? t->arena_cap : 1 << 20;
        while (cap < t->arena_used + n) cap *= 2;
        char *arena = realloc(t->arena, cap);
        if (!arena) return -1;
        t->arena = arena;
        t->arena_cap = cap;
    }
    if (t->arena_used + n > UINT32_MAX) return -2;
    memcpy(t->arena + t->arena_used, s, n);
    Slot *slot = &t->slots[j];
    slot->hash = h;
    slot->count = count;
    slot->offset = (uint32_t)t->arena_used;
    slot->length = (uint32_t)n;
    t->arena_used += n;
    t->used++;
    return 0;
}

static void table_free(Table *t) {
    free(t->slots);
    free(t->arena);
    memset(t, 0, sizeof(Table));
}

/* ASCII classes as the pre-tokenizers see them */
static inline int is_space(unsigned char c) { return c == ' ' || (c >= '\t' && c <= '\r'); }
static inline int is_letter(unsigned char c) { return (c | 0x20) >= 'a' && (c | 0x20) <= 'z'; }
static inline int is_digit(unsigned char c) { return c >= '0' && c <= '9'; }
static inline int is_punct(unsigned char c) { return (c >= '!' && c <= '/') || (c >= ':' && c <= '@') || (c >= '[' && c <= '`') || (c >= '{' && c <= '~'); }

/* GPT-2's byte -> printable character table (UTF-8), built once */
static char byte_char[256][3];
static unsigned char byte_char_len[256];

static void init_byte_chars(void) {
    int next = 256;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        int cp = printable ? b : next++;
        if (cp < 0x80) {
            byte_char[b][0] = (char)cp;
            byte_char_len[b] = 1;
        } else {
            byte_char[b][0] = (char)(0xC0 | (cp >> 6));
            byte_char[b][1] = (char)(0x80 | (cp & 0x3F));
            byte_char_len[b] = 2;
        }
    }
}

static char *scratch(ChunkCounter *self, size_t n) {
    if (n > self->buffer_cap) {
        size_t cap = self->buffer_cap ? self->buffer_cap : 256;
        while (cap < n) cap *= 2;
        char *buffer = realloc(self->buffer, cap);
        if (!buffer) return NULL;
        self->buffer = buffer;
        self->buffer_cap = cap;
    }
    return self->buffer;
}

static int add_word(ChunkCounter *self, const char *s, size_t n) { return table_add(&self->words, s, n, self->weight); }

static int add_byte_level_word(ChunkCounter *self, const char *s, size_t n) {
    char *out = scratch(self, 2 * n);
    if (!out) return -1;
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char b = (unsigned char)s[i];
        memcpy(out + k, byte_char[b], byte_char_len[b]);
        k += byte_char_len[b];
    }
    return add_word(self, out, k);
}

/* GPT-2's pattern on ASCII: 's|'t|'re|'ve|'m|'ll|'d| ?L+| ?N+| ?[^\sLN]+|\s+(?!\S)|\s+ */
static int byte_level_words(ChunkCounter *self, const char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        unsigned char c = (unsigned char)s[i];
        size_t j = i;
        if (c == '\'' && i + 1 < n) {
            unsigned char d = (unsigned char)s[i + 1], e = i + 2 < n ? (unsigned char)s[i + 2] : 0;
            size_t len = (d == 's' || d == 't' || d == 'm' || d == 'd') ? 2
                         : ((d == 'r' && e == 'e') || (d == 'v' && e == 'e') || (d == 'l' && e == 'l')) ? 3 : 0;
            if (len) {
                if (add_byte_level_word(self, s + i, len) < 0) return -1;
                i += len;
                continue;
            }
        }
        if (c == ' ' && i + 1 < n && !is_space((unsigned char)s[i + 1])) j = i + 1;
        unsigned char d = (unsigned char)s[j];
        if (!is_space(d)) {
            size_t k = j + 1;
            if (is_letter(d))
                while (k < n && is_letter((unsigned char)s[k])) k++;
            else if (is_digit(d))
                while (k < n && is_digit((unsigned char)s[k])) k++;
            else
                while (k < n && !is_space((unsigned char)s[k]) && !is_letter((unsigned char)s[k]) && !is_digit((unsigned char)s[k])) k++;
            if (add_byte_level_word(self, s + i, k - i) < 0) return -1;
            i = k;
            continue;
        }
        size_t k = i;
        while (k < n && is_space((unsigned char)s[k])) k++;
        if (k < n && k - i >= 2) k--; /* \s+(?!\S): the last space stays with the next token */
        if (add_byte_level_word(self, s + i, k - i) < 0) return -1;
        i = k;
    }
    return 0;
}

/* Metaspace with split: spaces become the replacement, and every replacement starts a new piece */
static int metaspace_words(ChunkCounter *self, const char *s, size_t n) {
    size_t r = self->replacement_len;
    char *out = scratch(self, (n + 1) * r);
    if (!out) return -1;
    size_t k = 0, start = 0;
    /* as the library: no prefix where the text already starts with a space or the replacement */
    if (self->prepend && s[0] != ' ' && !(n >= r && memcmp(s, self->replacement, r) == 0)) {
        memcpy(out, self->replacement, r);
        k = r;
    }
    for (size_t i = 0; i < n; i++) {
        int space = s[i] == ' ';
        if (space || (s[i] == self->replacement[0] && i + r <= n && memcmp(s + i, self->replacement, r) == 0)) {
            if (k > start) { /* a piece ends before each replacement */
                if (add_word(self, out + start, k - start) < 0) return -1;
                start = k;
            }
            memcpy(out + k, self->replacement, r);
            k += r;
            i += space ? 0 : r - 1;
        } else {
            out[k++] = (char)(self->lowercase && s[i] >= 'A' && s[i] <= 'Z' ? s[i] + 32 : s[i]);
        }
    }
    return add_word(self, out + start, k - start);
}

/* BERT: (BertNormalizer's clean_text and lowercase), then split on whitespace and isolate punctuation */
static int bert_words(ChunkCounter *self, const char *s, size_t n) {
    char *out = scratch(self, n);
    if (!out) return -1;
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (self->clean_text) {
            if (c == '\t' || c == '\n' || c == '\r') c = ' ';
            else if (c < 0x20 || c == 0x7F) continue;
        }
        out[k++] = (char)(self->lowercase && c >= 'A' && c <= 'Z' ? c + 32 : c);
    }
    size_t start = 0;
    for (size_t i = 0; i <= k; i++) {
        unsigned char c = i < k ? (unsigned char)out[i] : ' ';
        int space = c == ' ' || (c >= '\t' && c <= '\r');
        if (space || is_punct(c)) {
            if (i > start && add_word(self, out + start, i - start) < 0) return -1;
            if (!space && add_word(self, out + i, 1) < 0) return -1;
            start = i + 1;
        }
    }
    return 0;
}

static int is_ascii(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] >= 0x80) return 0;
    return 1;
}

/* Split one distinct chunk (seen `count` times) into words; 1 when it is left to the caller. */
static int split_chunk(ChunkCounter *self, const char *s, size_t n, int64_t count) {
    if (self->mode == MODE_CHUNKS || !(self->any_text || is_ascii(s, n))) return 1;
    self->weight = count;
    switch (self->mode) {
    case MODE_METASPACE: return metaspace_words(self, s, n);
    case MODE_BYTE_LEVEL:
        if ((self->add_prefix_space && s[0] != ' ') || self->lowercase) { /* prepare a copy: words use the scratch */
            char *copy = malloc(n + 1);
            if (!copy) return -1;
            size_t k = 0;
            if (self->add_prefix_space && s[0] != ' ') copy[k++] = ' ';
            for (size_t i = 0; i < n; i++) copy[k++] = (char)(self->lowercase && s[i] >= 'A' && s[i] <= 'Z' ? s[i] + 32 : s[i]);
            int err = byte_level_words(self, copy, k);
            free(copy);
            return err;
        }
        return byte_level_words(self, s, n);
    default: return bert_words(self, s, n);
    }
}

/* True when the character that ends at s[i - 1] (valid UTF-8, i > 0) is whitespace as the pre-tokenizers
 * see it: Unicode White_Space, the set of the byte-level pattern's \s and of Rust's char::is_whitespace. */
static int ends_with_space(const char *s, size_t i) {
    unsigned char c = (unsigned char)s[i - 1];
    if (c < 0x80) return is_space(c);
    size_t k = i - 1;
    while (k > 0 && ((unsigned char)s[k] & 0xC0) == 0x80) k--; /* back to the lead byte */
    unsigned char lead = (unsigned char)s[k];
    uint32_t cp = lead >= 0xF0 ? lead & 0x07u : lead >= 0xE0 ? lead & 0x0Fu : lead & 0x1Fu;
    for (size_t j = k + 1; j < i; j++) cp = (cp << 6) | ((unsigned char)s[j] & 0x3Fu);
    return cp == 0x85 || cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 ||
           cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

/* Cut before each space that follows a non-whitespace character. A space after whitespace stays in its
 * chunk: GPT-2's \s+(?!\S) gives "a\t  b" the words "a", "\t ", " b", so a whitespace run must not be cut. */
static int count_text(ChunkCounter *self, const char *s, size_t n) {
    size_t start = 0;
    for (size_t i = 1; i < n; i++) {
        if (s[i] == ' ' && !ends_with_space(s, i)) {
            int err = table_add(&self->chunks, s + start, i - start, 1);
            if (err) return err;
            start = i;
        }
    }
    return n ? table_add(&self->chunks, s + start, n - start, 1) : 0;
}

/* Split every pending chunk this module can split into the words table; the others go to *rest. */
static int counter_drain(ChunkCounter *self, Table *rest) {
    for (size_t i = 0; i < self->chunks.capacity; i++) {
        Slot *slot = &self->chunks.slots[i];
        if (!slot->hash) continue;
        const char *text = self->chunks.arena + slot->offset;
        int err = split_chunk(self, text, slot->length, slot->count);
        if (err == 1) err = table_add(rest, text, slot->length, slot->count);
        if (err) return err;
    }
    table_free(&self->chunks);
    return 0;
}

static int counter_init(ChunkCounter *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"mode", "replacement", "prepend", "lowercase", "add_prefix_space", "clean_text",
                            "any_text", NULL};
    const char *mode = "chunks", *replacement = "\xe2\x96\x81";
    int prepend = 0, lowercase = 0, add_prefix_space = 0, clean_text = 0, any_text = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|s$sipppp", names, &mode, &replacement, &prepend, &lowercase,
                                     &add_prefix_space, &clean_text, &any_text))
        return -1;
    if (!strcmp(mode, "chunks")) self->mode = MODE_CHUNKS;
    else if (!strcmp(mode, "metaspace")) self->mode = MODE_METASPACE;
    else if (!strcmp(mode, "byte_level")) self->mode = MODE_BYTE_LEVEL;
    else if (!strcmp(mode, "bert")) self->mode = MODE_BERT;
    else {
        PyErr_Format(PyExc_ValueError, "ChunkCounter: unknown mode %s (chunks, metaspace, byte_level, bert)", mode);
        return -1;
    }
    size_t r = strlen(replacement);
    if (r == 0 || r >= sizeof(self->replacement)) {
        PyErr_SetString(PyExc_ValueError, "ChunkCounter: replacement must be one character");
        return -1;
    }
    memcpy(self->replacement, replacement, r);
    self->replacement_len = r;
    /* prepend: 0 never, 1 always, 2 first (only at the start of a text) */
    self->prepend = prepend, self->lowercase = lowercase;
    self->add_prefix_space = add_prefix_space, self->clean_text = clean_text;
    self->any_text = any_text && self->mode == MODE_METASPACE && !lowercase;
    return 0;
}

static PyObject *counter_update(ChunkCounter *self, PyObject *texts) {
    PyObject *seq = PySequence_Fast(texts, "ChunkCounter.update expects a list of str");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyUnicode_Check(items[i])) {
            PyErr_Format(PyExc_TypeError, "ChunkCounter.update: item %zd is %.100s, not str", i, Py_TYPE(items[i])->tp_name);
            Py_DECREF(seq);
            return NULL;
        }
        Py_ssize_t size;
        const char *utf8 = PyUnicode_AsUTF8AndSize(items[i], &size);
        if (!utf8) {
            Py_DECREF(seq);
            return NULL;
        }
        int err = count_text(self, utf8, (size_t)size);
        if (err) {
            Py_DECREF(seq);
            if (err == -2) return PyErr_Format(PyExc_MemoryError, "ChunkCounter: more than 4 GB of distinct chunks");
            return PyErr_NoMemory();
        }
        self->texts++;
        self->bytes += size;
    }
    Py_DECREF(seq);
    Py_RETURN_NONE;
}

static PyObject *table_items(Table *t) {
    /* {text: count}, filled in byte order of the keys so nothing depends on hash order */
    PyObject *result = PyDict_New();
    if (!result) return NULL;
    for (size_t i = 0; i < t->capacity; i++) {
        Slot *slot = &t->slots[i];
        if (!slot->hash) continue;
        PyObject *text = PyUnicode_DecodeUTF8(t->arena + slot->offset, slot->length, "strict");
        PyObject *count = text ? PyLong_FromLongLong(slot->count) : NULL;
        if (!count || PyDict_SetItem(result, text, count) < 0) {
            Py_XDECREF(text);
            Py_XDECREF(count);
            Py_DECREF(result);
            return NULL;
        }
        Py_DECREF(text);
        Py_DECREF(count);
    }
    return result;
}

static PyObject *counter_drain_py(ChunkCounter *self, PyObject *unused) {
    Table rest = {0};
    int err = counter_drain(self, &rest);
    if (err) {
        table_free(&rest);
        return err == -2 ? PyErr_Format(PyExc_MemoryError, "ChunkCounter: more than 4 GB of words") : PyErr_NoMemory();
    }
    PyObject *result = table_items(&rest);
    table_free(&rest);
    return result;
}

static PyObject *counter_words(ChunkCounter *self, PyObject *unused) {
    if (self->chunks.used) {
        PyErr_SetString(PyExc_RuntimeError, "ChunkCounter.words(): chunks are pending; call drain() first");
        return NULL;
    }
    return table_items(&self->words);
}

static PyObject *counter_get_pending(ChunkCounter *self, void *closure) {
    return PyLong_FromSize_t(self->chunks.arena_used);
}
static PyObject *counter_get_texts(ChunkCounter *self, void *closure) { return PyLong_FromLongLong(self->texts); }
static PyObject *counter_get_bytes(ChunkCounter *self, void *closure) { return PyLong_FromLongLong(self->bytes); }

static void counter_dealloc(ChunkCounter *self) {
    table_free(&self->words);
    table_free(&self->chunks);
    free(self->buffer);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef counter_methods[] = {
    {"update", (PyCFunction)counter_update, METH_O, "Count the chunks of a list of texts."},
    {"drain", (PyCFunction)counter_drain_py, METH_NOARGS,
     "Split the pending chunks this module can split into words; return the others as {chunk: count}\n"
     "(for the caller to split) and start over with no pending chunks. Counting may go on."},
    {"words", (PyCFunction)counter_words, METH_NOARGS, "{pre-token: count} of the drained chunks."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef counter_getset[] = {
    {"texts", (getter)counter_get_texts, NULL, "texts counted so far", NULL},
    {"bytes", (getter)counter_get_bytes, NULL, "UTF-8 bytes counted so far", NULL},
    {"pending", (getter)counter_get_pending, NULL, "bytes held by distinct chunks not drained yet", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ChunkCounterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "lmssl._bpe.ChunkCounter",
    .tp_basicsize = sizeof(ChunkCounter),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "ChunkCounter(mode='chunks', *, replacement='\u2581', prepend=0, lowercase=False,\n"
              "             add_prefix_space=False, clean_text=False, any_text=False)\n\n"
              "Counts the distinct space-separated chunks of many texts. drain() splits the pending ASCII chunks\n"
              "(all of them for metaspace with any_text) into pre-tokens in the metaspace, byte_level and bert\n"
              "modes and returns the other chunks, for the caller to pre-tokenize; words() then gives the counts.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)counter_init,
    .tp_dealloc = (destructor)counter_dealloc,
    .tp_methods = counter_methods,
    .tp_getset = counter_getset,
};

/* ------------------------------------------------------------------------------------------ */
/* BPE merges                                                                                   */

typedef struct {
    uint64_t key; /* (left << 32) | right: every value is a real pair, (0, 0) too where id 0 is a symbol */
    int64_t count;
    int32_t *words; /* words that contained the pair when it was last counted up (may be stale) */
    int32_t nwords, capwords;
    int32_t queued; /* the merge after which the pair was last queued */
    int32_t full;   /* the slot holds a pair (no key can mark an empty slot) */
} Pair;

typedef struct {
    Pair *slots;
    size_t capacity, used;
} PairTable;

typedef struct {
    int64_t count;
    uint64_t key;
} HeapItem;

typedef struct {
    HeapItem *items;
    size_t size, cap;
} Heap;

static inline uint64_t mix64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

static int pairs_grow(PairTable *t) {
    size_t capacity = t->capacity ? t->capacity * 2 : 1 << 16;
    Pair *slots = calloc(capacity, sizeof(Pair));
    if (!slots) return -1;
    for (size_t i = 0; i < t->capacity; i++) {
        if (!t->slots[i].full) continue;
        size_t j = mix64(t->slots[i].key) & (capacity - 1);
        while (slots[j].full) j = (j + 1) & (capacity - 1);
        slots[j] = t->slots[i];
    }
    free(t->slots);
    t->slots = slots;
    t->capacity = capacity;
    return 0;
}

static Pair *pairs_get(PairTable *t, uint64_t key, int create) {
    if (create && (t->used + 1) * 2 > t->capacity && pairs_grow(t) < 0) return NULL;
    if (!t->capacity) return NULL;
    size_t j = mix64(key) & (t->capacity - 1);
    while (t->slots[j].full) {
        if (t->slots[j].key == key) return &t->slots[j];
        j = (j + 1) & (t->capacity - 1);
    }
    if (!create) return NULL;
    t->slots[j].key = key;
    t->slots[j].full = 1;
    t->used++;
    return &t->slots[j];
}

static int pair_note_word(Pair *p, int32_t word) {
    if (p->nwords && p->words[p->nwords - 1] == word) return 0;
    if (p->nwords == p->capwords) {
        int32_t cap = p->capwords ? p->capwords * 2 : 4;
        int32_t *words = realloc(p->words, (size_t)cap * sizeof(int32_t));
        if (!words) return -1;
        p->words = words;
        p->capwords = cap;
    }
    p->words[p->nwords++] = word;
    return 0;
}

/* max-heap: larger count first, then the smaller (left, right) pair, as the tokenizers library */
static inline int heap_before(const HeapItem *a, const HeapItem *b) {
    return a->count != b->count ? a->count > b->count : a->key < b->key;
}

static int heap_push(Heap *h, int64_t count, uint64_t key) {
    if (h->size == h->cap) {
        size_t cap = h->cap ? h->cap * 2 : 1 << 16;
        HeapItem *items = realloc(h->items, cap * sizeof(HeapItem));
        if (!items) return -1;
        h->items = items;
        h->cap = cap;
    }
    size_t i = h->size++;
    HeapItem item = {count, key};
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!heap_before(&item, &h->items[parent])) break;
        h->items[i] = h->items[parent];
        i = parent;
    }
    h->items[i] = item;
    return 0;
}

static HeapItem heap_pop(Heap *h) {
    HeapItem top = h->items[0], last = h->items[--h->size];
    size_t i = 0;
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= h->size) break;
        if (child + 1 < h->size && heap_before(&h->items[child + 1], &h->items[child])) child++;
        if (!heap_before(&h->items[child], &last)) break;
        h->items[i] = h->items[child];
        i = child;
    }
    if (h->size) h->items[i] = last;
    return top;
}

typedef struct {
    int32_t *symbols;   /* all words' symbols, word w at symbols[start[w] .. start[w] + length[w]) */
    int64_t *start;
    int32_t *length;
    int64_t *count;
    int32_t *stamp;     /* last merge that rewrote the word */
    Py_ssize_t nwords;
} Words;

/* Add sign * count of word w's adjacent pairs: all of them (left < 0), or only those holding left, right or
 * merged, the only ones a merge of left+right into merged can change. Pairs holding merged note w. */
static int count_word_pairs(PairTable *t, Words *ws, int32_t w, int sign, int32_t left, int32_t right, int32_t merged) {
    int32_t *s = ws->symbols + ws->start[w];
    for (int32_t i = 0; i + 1 < ws->length[w]; i++) {
        int32_t x = s[i], y = s[i + 1];
        if (left >= 0 && x != left && x != right && x != merged && y != left && y != right && y != merged) continue;
        Pair *p = pairs_get(t, ((uint64_t)x << 32) | (uint32_t)y, sign > 0);
        if (!p) {
            if (sign > 0) return -1;
            continue;
        }
        p->count += sign * ws->count[w];
        if (sign > 0 && (left < 0 || x == merged || y == merged) && pair_note_word(p, w) < 0) return -1;
    }
    return 0;
}

/* Merge left+right into merged in word w, left to right without overlaps. */
static void merge_word(Words *ws, int32_t w, int32_t left, int32_t right, int32_t merged) {
    int32_t *s = ws->symbols + ws->start[w];
    int32_t n = ws->length[w], out = 0;
    for (int32_t i = 0; i < n; i++) {
        if (i + 1 < n && s[i] == left && s[i + 1] == right) {
            s[out++] = merged;
            i++;
        } else {
            s[out++] = s[i];
        }
    }
    ws->length[w] = out;
}

static int word_has_pair(Words *ws, int32_t w, int32_t left, int32_t right) {
    int32_t *s = ws->symbols + ws->start[w];
    for (int32_t i = 0; i + 1 < ws->length[w]; i++)
        if (s[i] == left && s[i + 1] == right) return 1;
    return 0;
}

typedef struct {
    int64_t count;
    Py_UCS4 cp;
} CharCount;

static int by_count_desc(const void *x, const void *y) {
    const CharCount *a = x, *b = y;
    if (a->count != b->count) return a->count > b->count ? -1 : 1;
    return a->cp < b->cp ? -1 : a->cp > b->cp;
}

static PyObject *train_bpe(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"words", "vocab_size", "min_frequency", "limit_alphabet", "initial_alphabet",
                            "special_tokens", "continuing_subword_prefix", "end_of_word_suffix", NULL};
    PyObject *word_counts, *initial = NULL, *specials = NULL, *limit_obj = Py_None;
    Py_ssize_t vocab_size;
    long long min_frequency = 0;
    const char *prefix = NULL, *suffix = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!n|LOOOzz", names, &PyDict_Type, &word_counts, &vocab_size,
                                     &min_frequency, &limit_obj, &initial, &specials, &prefix, &suffix))
        return NULL;
    Py_ssize_t limit_alphabet = -1;
    if (limit_obj != Py_None && (limit_alphabet = PyLong_AsSsize_t(limit_obj)) < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "limit_alphabet must be >= 0 or None");
        return NULL;
    }

    PyObject *result = NULL, *vocab = PyList_New(0), *token_ids = PyDict_New(), *merges = PyList_New(0);
    PyObject *char_counts = PyDict_New(), *prefix_str = NULL, *suffix_str = NULL;
    Words ws = {0};
    PairTable table = {0};
    Heap heap = {0};
    int32_t *first_id = NULL, *inner_id = NULL, *last_id = NULL, *only_id = NULL; /* per code point slot */
    Py_UCS4 *chars = NULL;
    Py_ssize_t nchars = 0;
    unsigned char *forms = calloc(0x110000, 1); /* which decorated forms of each character occur */
    if (!forms) {
        PyErr_NoMemory();
        goto done;
    }
    if (!vocab || !token_ids || !merges || !char_counts) goto done;
    if (prefix && !(prefix_str = PyUnicode_FromString(prefix))) goto done;
    if (suffix && !(suffix_str = PyUnicode_FromString(suffix))) goto done;

#define ADD_TOKEN(obj, out_id)                                                        \
    do {                                                                             \
        PyObject *_known = PyDict_GetItemWithError(token_ids, (obj));                \
        if (_known) {                                                                \
            (out_id) = (int32_t)PyLong_AsLong(_known);                               \
        } else {                                                                     \
            if (PyErr_Occurred()) goto done;                                         \
            PyObject *_id = PyLong_FromSsize_t(PyList_GET_SIZE(vocab));              \
            if (!_id || PyDict_SetItem(token_ids, (obj), _id) < 0) {                 \
                Py_XDECREF(_id);                                                     \
                goto done;                                                           \
            }                                                                        \
            Py_DECREF(_id);                                                          \
            if (PyList_Append(vocab, (obj)) < 0) goto done;                          \
            (out_id) = (int32_t)(PyList_GET_SIZE(vocab) - 1);                        \
        }                                                                            \
    } while (0)

    /* 1. special tokens */
    if (specials) {
        PyObject *seq = PySequence_Fast(specials, "special_tokens must be a list of str");
        if (!seq) goto done;
        for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
            int32_t id;
            PyObject *token = PySequence_Fast_GET_ITEM(seq, i);
            if (!PyUnicode_Check(token)) {
                Py_DECREF(seq);
                PyErr_SetString(PyExc_TypeError, "special_tokens must be a list of str");
                goto done;
            }
            ADD_TOKEN(token, id);
            (void)id;
        }
        Py_DECREF(seq);
    }
    /* 2. the alphabet: character counts weighted by word counts; the initial alphabet always stays */
    {
        Py_ssize_t pos = 0, total = 0;
        PyObject *word, *count;
        int64_t *cp_counts = calloc(0x110000, sizeof(int64_t));
        if (!cp_counts) {
            PyErr_NoMemory();
            goto done;
        }
        while (PyDict_Next(word_counts, &pos, &word, &count)) {
            if (!PyUnicode_Check(word) || !PyLong_Check(count)) {
                free(cp_counts);
                PyErr_SetString(PyExc_TypeError, "words must map str to int");
                goto done;
            }
            long long c = PyLong_AsLongLong(count);
            if (c < 0) {
                free(cp_counts);
                if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "words: negative count for %R", word);
                goto done;
            }
            Py_ssize_t n = PyUnicode_GET_LENGTH(word);
            int kind = PyUnicode_KIND(word);
            const void *data = PyUnicode_DATA(word);
            for (Py_ssize_t i = 0; i < n; i++) {
                Py_UCS4 cp = PyUnicode_READ(kind, data, i);
                cp_counts[cp] += c;
                forms[cp] |= n == 1 ? 4 : i == n - 1 ? 2 : i > 0 ? 1 : 0; /* only / last / inner */
            }
            total += n;
        }
        if (initial) {
            PyObject *seq = PySequence_Fast(initial, "initial_alphabet must be a list of str");
            if (!seq) {
                free(cp_counts);
                goto done;
            }
            for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
                PyObject *ch = PySequence_Fast_GET_ITEM(seq, i);
                if (!PyUnicode_Check(ch) || PyUnicode_GET_LENGTH(ch) != 1) {
                    Py_DECREF(seq);
                    free(cp_counts);
                    PyErr_SetString(PyExc_ValueError, "initial_alphabet must hold single characters");
                    goto done;
                }
                cp_counts[PyUnicode_READ_CHAR(ch, 0)] = INT64_MAX;
            }
            Py_DECREF(seq);
        }
        for (Py_UCS4 cp = 0; cp < 0x110000; cp++) nchars += cp_counts[cp] > 0;
        chars = malloc((nchars ? nchars : 1) * sizeof(Py_UCS4));
        if (!chars) {
            free(cp_counts);
            PyErr_NoMemory();
            goto done;
        }
        Py_ssize_t k = 0;
        for (Py_UCS4 cp = 0; cp < 0x110000; cp++)
            if (cp_counts[cp] > 0) chars[k++] = cp;
        if (limit_alphabet >= 0 && nchars > limit_alphabet) {
            /* keep the most frequent characters (ties: the smaller code point) */
            CharCount *ranked = malloc(nchars * sizeof(CharCount));
            if (!ranked) {
                free(cp_counts);
                PyErr_NoMemory();
                goto done;
            }
            for (Py_ssize_t i = 0; i < nchars; i++) ranked[i].count = cp_counts[chars[i]], ranked[i].cp = chars[i];
            qsort(ranked, nchars, sizeof(CharCount), by_count_desc);
            for (Py_ssize_t i = limit_alphabet; i < nchars; i++) cp_counts[ranked[i].cp] = -1;
            free(ranked);
            k = 0;
            for (Py_ssize_t i = 0; i < nchars; i++)
                if (cp_counts[chars[i]] > 0) chars[k++] = chars[i];
            nchars = k;
        }
        free(cp_counts);
        (void)total;
    }
    /* symbol ids per code point and position (first / inner / last / only) */
    first_id = malloc(0x110000 * sizeof(int32_t));
    inner_id = malloc(0x110000 * sizeof(int32_t));
    last_id = malloc(0x110000 * sizeof(int32_t));
    only_id = malloc(0x110000 * sizeof(int32_t));
    if (!first_id || !inner_id || !last_id || !only_id) {
        PyErr_NoMemory();
        goto done;
    }
    memset(first_id, 0xff, 0x110000 * sizeof(int32_t));
    memset(inner_id, 0xff, 0x110000 * sizeof(int32_t));
    memset(last_id, 0xff, 0x110000 * sizeof(int32_t));
    memset(only_id, 0xff, 0x110000 * sizeof(int32_t));
    for (Py_ssize_t i = 0; i < nchars; i++) { /* the plain characters, in code point order */
        PyObject *s = PyUnicode_FromOrdinal(chars[i]);
        int32_t id;
        if (!s) goto done;
        ADD_TOKEN(s, id);
        Py_DECREF(s);
        first_id[chars[i]] = id;
    }
    /* decorated forms (prefix for non-initial, suffix for final characters), in code point order */
    for (int form = 0; form < 3; form++) { /* 0 inner, 1 last, 2 only (first and last) */
        for (Py_ssize_t i = 0; i < nchars; i++) {
            Py_UCS4 cp = chars[i];
            int initial_pos = form == 2, final_pos = form >= 1;
            if (!(forms[cp] & (1 << form))) continue; /* as the tokenizers library: only forms that occur */
            PyObject *s = PyUnicode_FromOrdinal(cp), *tmp;
            if (!s) goto done;
            if (!initial_pos && prefix_str) {
                tmp = PyUnicode_Concat(prefix_str, s);
                Py_DECREF(s);
                if (!(s = tmp)) goto done;
            }
            if (final_pos && suffix_str) {
                tmp = PyUnicode_Concat(s, suffix_str);
                Py_DECREF(s);
                if (!(s = tmp)) goto done;
            }
            int32_t id;
            ADD_TOKEN(s, id);
            Py_DECREF(s);
            (form == 0 ? inner_id : form == 1 ? last_id : only_id)[cp] = id;
        }
    }
    if (PyList_GET_SIZE(vocab) >= INT32_MAX / 2) {
        PyErr_SetString(PyExc_ValueError, "alphabet too large");
        goto done;
    }

    /* 3. words as symbol ids; a character outside the alphabet ends a word part */
    {
        Py_ssize_t total = 0, pos = 0;
        PyObject *word, *count;
        while (PyDict_Next(word_counts, &pos, &word, &count)) total += PyUnicode_GET_LENGTH(word);
        ws.symbols = malloc((total ? total : 1) * sizeof(int32_t));
        Py_ssize_t cap = total / 2 + 1; /* every kept part has at least two symbols */
        ws.start = malloc(cap * sizeof(int64_t));
        ws.length = malloc(cap * sizeof(int32_t));
        ws.count = malloc(cap * sizeof(int64_t));
        if (!ws.symbols || !ws.start || !ws.length || !ws.count) {
            PyErr_NoMemory();
            goto done;
        }
        /* visit words in sorted order so pair bookkeeping never depends on dict order */
        PyObject *keys = PyDict_Keys(word_counts);
        if (!keys || PyList_Sort(keys) < 0) {
            Py_XDECREF(keys);
            goto done;
        }
        int64_t used = 0;
        Py_ssize_t w = 0;
        for (Py_ssize_t k = 0; k < PyList_GET_SIZE(keys); k++) {
            word = PyList_GET_ITEM(keys, k);
            long long c = PyLong_AsLongLong(PyDict_GetItem(word_counts, word));
            Py_ssize_t n = PyUnicode_GET_LENGTH(word);
            int kind = PyUnicode_KIND(word);
            const void *data = PyUnicode_DATA(word);
            int64_t begin = used;
            for (Py_ssize_t i = 0; i < n; i++) {
                Py_UCS4 cp = PyUnicode_READ(kind, data, i);
                int32_t id = first_id[cp] < 0 ? -1
                             : n == 1 ? only_id[cp] : i == 0 ? first_id[cp] : i == n - 1 ? last_id[cp] : inner_id[cp];
                if (id < 0) { /* unknown character: close the current part */
                    if (used - begin >= 2 && c > 0 && w < cap) {
                        ws.start[w] = begin, ws.length[w] = (int32_t)(used - begin), ws.count[w] = c, w++;
                    } else {
                        used = begin;
                    }
                    begin = used;
                    continue;
                }
                ws.symbols[used++] = id;
            }
            if (used - begin >= 2 && c > 0 && w < cap) {
                ws.start[w] = begin, ws.length[w] = (int32_t)(used - begin), ws.count[w] = c, w++;
            } else {
                used = begin;
            }
        }
        Py_DECREF(keys);
        ws.nwords = w;
        ws.stamp = calloc(w ? w : 1, sizeof(int32_t));
        if (!ws.stamp) {
            PyErr_NoMemory();
            goto done;
        }
    }

    /* 4. merges */
    {
        int failed = 0;
        Py_BEGIN_ALLOW_THREADS
        for (int32_t w = 0; w < ws.nwords && !failed; w++)
            if (count_word_pairs(&table, &ws, w, +1, -1, -1, -1) < 0) failed = 1;
        for (size_t i = 0; i < table.capacity && !failed; i++)
            if (table.slots[i].full && table.slots[i].count > 0 && heap_push(&heap, table.slots[i].count, table.slots[i].key) < 0)
                failed = 1;
        Py_END_ALLOW_THREADS
        if (failed) {
            PyErr_NoMemory();
            goto done;
        }
    }
    int32_t merge_no = 0;
    uint64_t *fresh = NULL;
    size_t nfresh = 0, capfresh = 0;
    while (PyList_GET_SIZE(vocab) < vocab_size && heap.size) {
        HeapItem top = heap_pop(&heap);
        Pair *p = pairs_get(&table, top.key, 0);
        if (!p || p->count <= 0) continue;
        if (p->count != top.count) { /* stale entry: requeue with the current count */
            if (heap_push(&heap, p->count, top.key) < 0) {
                PyErr_NoMemory();
                break;
            }
            continue;
        }
        if (p->count < min_frequency) break;
        int32_t left = (int32_t)(top.key >> 32), right = (int32_t)(top.key & 0xffffffffu);
        /* the new token: left + right, without right's continuing-subword prefix */
        PyObject *a = PyList_GET_ITEM(vocab, left), *b = PyList_GET_ITEM(vocab, right), *tail, *token;
        if (prefix_str && PyUnicode_Tailmatch(b, prefix_str, 0, PY_SSIZE_T_MAX, -1) == 1)
            tail = PyUnicode_Substring(b, PyUnicode_GET_LENGTH(prefix_str), PyUnicode_GET_LENGTH(b));
        else
            tail = Py_NewRef(b);
        if (!tail) break;
        token = PyUnicode_Concat(a, tail);
        Py_DECREF(tail);
        if (!token) break;
        int32_t merged;
        PyObject *pair = PyTuple_Pack(2, a, b);
        if (!pair || PyList_Append(merges, pair) < 0) {
            Py_XDECREF(pair);
            Py_DECREF(token);
            break;
        }
        Py_DECREF(pair);
        {
            PyObject *_known = PyDict_GetItemWithError(token_ids, token);
            if (_known) {
                merged = (int32_t)PyLong_AsLong(_known);
            } else if (PyErr_Occurred()) {
                Py_DECREF(token);
                break;
            } else {
                PyObject *_id = PyLong_FromSsize_t(PyList_GET_SIZE(vocab));
                if (!_id || PyDict_SetItem(token_ids, token, _id) < 0 || PyList_Append(vocab, token) < 0) {
                    Py_XDECREF(_id);
                    Py_DECREF(token);
                    break;
                }
                Py_DECREF(_id);
                merged = (int32_t)(PyList_GET_SIZE(vocab) - 1);
            }
        }
        Py_DECREF(token);
        merge_no++;
        /* rewrite every word that holds the pair; take its pairs out, merge, put them back */
        int failed = 0;
        int32_t nw = p->nwords, *list = p->words;
        p->words = NULL, p->nwords = p->capwords = 0;
        nfresh = 0;
        Py_BEGIN_ALLOW_THREADS
        for (int32_t k = 0; k < nw && !failed; k++) {
            int32_t w = list[k];
            if (ws.stamp[w] == merge_no || !word_has_pair(&ws, w, left, right)) continue;
            ws.stamp[w] = merge_no;
            count_word_pairs(&table, &ws, w, -1, left, right, merged);
            merge_word(&ws, w, left, right, merged);
            if (count_word_pairs(&table, &ws, w, +1, left, right, merged) < 0) failed = 1;
            int32_t *s = ws.symbols + ws.start[w];
            for (int32_t i = 0; i + 1 < ws.length[w] && !failed; i++) {
                if (s[i] != merged && s[i + 1] != merged) continue;
                if (nfresh == capfresh) {
                    capfresh = capfresh ? capfresh * 2 : 1024;
                    uint64_t *grown = realloc(fresh, capfresh * sizeof(uint64_t));
                    if (!grown) {
                        failed = 1;
                        break;
                    }
                    fresh = grown;
                }
                fresh[nfresh++] = ((uint64_t)s[i] << 32) | (uint32_t)s[i + 1];
            }
        }
        /* queue each pair the merge created once, with its final count */
        for (size_t i = 0; i < nfresh && !failed; i++) {
            Pair *q = pairs_get(&table, fresh[i], 0);
            if (!q || q->count <= 0 || q->queued == merge_no) continue;
            q->queued = merge_no;
            if (heap_push(&heap, q->count, fresh[i]) < 0) failed = 1;
        }
        Py_END_ALLOW_THREADS
        free(list);
        if (failed) {
            PyErr_NoMemory();
            break;
        }
    }
    free(fresh);
    if (PyErr_Occurred()) goto done;
    result = Py_BuildValue("(OO)", vocab, merges);

done:
#undef ADD_TOKEN
    Py_XDECREF(vocab);
    Py_XDECREF(token_ids);
    Py_XDECREF(merges);
    Py_XDECREF(char_counts);
    Py_XDECREF(prefix_str);
    Py_XDECREF(suffix_str);
    free(first_id), free(inner_id), free(last_id), free(only_id), free(chars), free(forms);
    free(ws.symbols), free(ws.start), free(ws.length), free(ws.count), free(ws.stamp);
    for (size_t i = 0; i < table.capacity; i++) free(table.slots[i].words);
    free(table.slots);
    free(heap.items);
    return result;
}

static PyMethodDef module_methods[] = {
    {"train_bpe", (PyCFunction)(void (*)(void))train_bpe, METH_VARARGS | METH_KEYWORDS,
     "train_bpe(words, vocab_size, min_frequency=0, limit_alphabet=None, initial_alphabet=None, special_tokens=None,\n"
     "          continuing_subword_prefix=None, end_of_word_suffix=None) -> (vocab, merges)\n\n"
     "BPE merges learned from {word: count}; vocab lists tokens by id (special tokens, alphabet, merged tokens),\n"
     "merges lists (left, right) token pairs in the order they were learned."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "lmssl._bpe",
                                        "Chunk counting and BPE merges for lmssl's tokenizer stage.", -1, module_methods};

PyMODINIT_FUNC PyInit__bpe(void) {
    init_byte_chars();
    if (PyType_Ready(&ChunkCounterType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (!m) return NULL;
    Py_INCREF(&ChunkCounterType);
    if (PyModule_AddObject(m, "ChunkCounter", (PyObject *)&ChunkCounterType) < 0) {
        Py_DECREF(&ChunkCounterType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
