/* lmssl._unigram: a Unigram LM vocabulary trainer (Kudo 2018, "Subword Regularization", sec. 3.2)
 * that learns from word counts. Normalisation and pre-tokenisation stay in Python; seeding, EM and
 * pruning over code points live here. No dependencies beyond CPython and libc (pthreads).
 *
 * Outline of train():
 *   1. seeds: the maximal repeated substrings of the words (a suffix array over the unique words,
 *      each suffix weighted by its word's count) plus every character;
 *   2. EM on the word lattices (forward-backward, Bayesian M-step), then prune by the likelihood
 *      lost when a piece is replaced by its best alternative segmentation, until ~1.1 x vocab_size;
 *   3. keep every character and the most probable other pieces up to vocab_size.
 * Determinism: words are sorted, ties break on the piece string, and every floating-point sum runs
 * in a fixed order, so neither dict order nor the thread count changes the result. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef _WIN32
#include <pthread.h>
#define HAVE_PTHREADS 1
#endif

#define MAX_THREADS 64
#define MAX_PIECE_LENGTH 1024
#define SPACE_MARK 0x2581          /* "▁": may only start a piece (or be a piece on its own) */
#define MIN_EXPECTED 0.5           /* the M-step drops pieces expected less than this (as sentencepiece) */
#define UNSCORED_PENALTY 10.0      /* a kept piece without a usable estimate scores min - 10 */
#define PROB_SPACE_FLOOR (-650.0)  /* words whose all-characters path is above e^-650 (~1e-282)
                                      run forward-backward in plain doubles, the rest in logs */

typedef struct {
    int32_t piece;
    int32_t from; /* start position inside its word; the edge ends at from + length(piece) */
} Edge;

typedef struct {
    /* corpus: words sorted by code points; text holds their character ids, then the ids
       0..nalpha-1 themselves, so that every piece is a slice of text */
    int32_t *text;
    int64_t *wstart; /* word w is text[wstart[w] .. wstart[w+1]) */
    int64_t *wcount;
    int32_t nwords, nalpha, space, maxwlen;
    int64_t nchars, total;
    Py_UCS4 *alphabet; /* code point of each character id, ascending */

    /* pieces: ids 0..nalpha-1 are the characters; ids never change, dropped pieces die */
    int32_t npieces, nalive;
    int64_t *poff;
    int32_t *plen, *pword, *pat; /* one occurrence: word and start (for the alternatives) */
    int32_t *srank;              /* rank of the piece string among all pieces */
    double *logp, *prob, *expected;
    uint8_t *alive, *scored;

    /* lattice: the edges of word w are edges[wedge[w] .. wedge[w+1]), by start then length */
    Edge *edges;
    int64_t nedges;
    int64_t *wedge;
    double *post; /* expected count of each edge (E-step), summed per piece in edge order */

    int nthreads;
} Trainer;

/* ---------------------------------------------------------------- small helpers */

static void *xcalloc(size_t n, size_t size) { return calloc(n ? n : 1, size ? size : 1); }
static void *xmalloc(size_t n, size_t size) { return malloc((n ? n : 1) * (size ? size : 1)); }

/* Digamma by the recurrence psi(x) = psi(x + 1) - 1/x up to x >= 6, then the asymptotic series. */
static double digamma(double x)
{
    double r = 0.0, f;
    while (x < 6.0) {
        r -= 1.0 / x;
        x += 1.0;
    }
    f = 1.0 / (x * x);
    return r + log(x) - 0.5 / x
           - f * (1.0 / 12 - f * (1.0 / 120 - f * (1.0 / 252 - f * (1.0 / 240 - f / 132))));
}

static int cmp_slices(const int32_t *a, int32_t la, const int32_t *b, int32_t lb)
{
    int32_t n = la < lb ? la : lb, i;
    for (i = 0; i < n; i++)
        if (a[i] != b[i]) return a[i] < b[i] ? -1 : 1;
    return (la > lb) - (la < lb);
}

/* Stable merge sort of int32 ids under a comparator with context (C99 qsort has none). */
typedef int (*id_cmp)(const void *ctx, int32_t a, int32_t b);

static void merge_sort_rec(int32_t *a, int32_t *tmp, int64_t n, id_cmp cmp, const void *ctx)
{
    int64_t i, j, k, h;
    if (n < 16) {
        for (i = 1; i < n; i++) {
            int32_t v = a[i];
            for (j = i; j > 0 && cmp(ctx, a[j - 1], v) > 0; j--) a[j] = a[j - 1];
            a[j] = v;
        }
        return;
    }
    h = n / 2;
    merge_sort_rec(a, tmp, h, cmp, ctx);
    merge_sort_rec(a + h, tmp, n - h, cmp, ctx);
    if (cmp(ctx, a[h - 1], a[h]) <= 0) return;
    memcpy(tmp, a, (size_t)h * sizeof *a);
    for (i = 0, j = h, k = 0; i < h && j < n;) a[k++] = cmp(ctx, a[j], tmp[i]) < 0 ? a[j++] : tmp[i++];
    while (i < h) a[k++] = tmp[i++];
}

static int sort_ids(int32_t *ids, int64_t n, id_cmp cmp, const void *ctx)
{
    int32_t *tmp = xmalloc((size_t)(n / 2 + 1), sizeof *tmp);
    if (!tmp) return -1;
    merge_sort_rec(ids, tmp, n, cmp, ctx);
    free(tmp);
    return 0;
}

/* ---------------------------------------------------------------- threads */

typedef void (*work_fn)(Trainer *t, void *arg, int tid);
typedef struct {
    Trainer *t;
    void *arg;
    work_fn fn;
    int tid;
} Task;

#ifdef HAVE_PTHREADS
static void *task_main(void *p)
{
    Task *k = p;
    k->fn(k->t, k->arg, k->tid);
    return NULL;
}
#endif

/* Runs fn(t, arg, tid) for tid = 0..nthreads-1; each call owns a fixed slice of the work, so the
   results never depend on how many threads actually ran. */
static void parallel(Trainer *t, work_fn fn, void *arg)
{
    int i;
#ifdef HAVE_PTHREADS
    pthread_t th[MAX_THREADS];
    Task tasks[MAX_THREADS];
    int started[MAX_THREADS];
    for (i = 1; i < t->nthreads; i++) {
        tasks[i].t = t, tasks[i].arg = arg, tasks[i].fn = fn, tasks[i].tid = i;
        started[i] = pthread_create(&th[i], NULL, task_main, &tasks[i]) == 0;
    }
    fn(t, arg, 0);
    for (i = 1; i < t->nthreads; i++) {
        if (started[i]) pthread_join(th[i], NULL);
        else fn(t, arg, i); /* could not start a thread: do its share here */
    }
#else
    for (i = 0; i < t->nthreads; i++) fn(t, arg, i);
#endif
}

/* The first word of share k of the words (k = nthreads: the end), balanced by lattice edges. */
static int32_t share_start(const Trainer *t, int k)
{
    int64_t target = t->nedges / t->nthreads * k + t->nedges % t->nthreads * k / t->nthreads;
    int32_t a = 0, b = t->nwords;
    if (k == t->nthreads) return t->nwords;
    while (a < b) { /* the first word whose edges start at or after target */
        int32_t m = a + (b - a) / 2;
        if (t->wedge[m] < target) a = m + 1;
        else b = m;
    }
    return a;
}

/* ---------------------------------------------------------------- input */

typedef struct {
    Py_UCS4 *cps;   /* code points of the words with a positive count, in dict order */
    int64_t *off;   /* word i is cps[off[i] .. off[i+1]) */
    int64_t *count;
    int32_t nwords;
} RawWords;

static void raw_free(RawWords *r)
{
    free(r->cps), free(r->off), free(r->count);
}

/* Validates words (str -> int >= 0) and copies the words with a positive count. */
static int gather_words(PyObject *words, RawWords *raw)
{
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    int64_t nchars = 0, total = 0, n = 0, k = 0;

    memset(raw, 0, sizeof *raw);
    if (!PyDict_Check(words)) {
        PyErr_Format(PyExc_TypeError, "words must be a dict mapping str to int, not %.100s", Py_TYPE(words)->tp_name);
        return -1;
    }
    while (PyDict_Next(words, &pos, &key, &value)) {
        int overflow = 0;
        long long c;
        if (!PyUnicode_Check(key)) {
            PyErr_Format(PyExc_TypeError, "words must map str to int; found the key %R of type %.100s",
                         key, Py_TYPE(key)->tp_name);
            return -1;
        }
        if (!PyLong_Check(value) || PyBool_Check(value)) {
            PyErr_Format(PyExc_TypeError, "the count of word %R must be an int, not %.100s", key,
                         Py_TYPE(value)->tp_name);
            return -1;
        }
        c = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (c == -1 && PyErr_Occurred()) return -1;
        if (overflow > 0) {
            PyErr_Format(PyExc_ValueError, "the count of word %R (%R) does not fit in 64 bits", key, value);
            return -1;
        }
        if (overflow < 0 || c < 0) {
            PyErr_Format(PyExc_ValueError, "the count of word %R is negative (%R); counts must be >= 0", key, value);
            return -1;
        }
#if PY_VERSION_HEX < 0x030C0000
        if (PyUnicode_READY(key) < 0) return -1;
#endif
        if (c == 0 || PyUnicode_GET_LENGTH(key) == 0) continue;
        if (total > INT64_MAX - c) {
            PyErr_SetString(PyExc_ValueError, "the word counts sum past 2**63 - 1");
            return -1;
        }
        total += c;
        nchars += PyUnicode_GET_LENGTH(key);
        n++;
    }
    if (nchars > INT32_MAX / 2) {
        PyErr_Format(PyExc_ValueError, "the words hold %lld characters; at most %d are supported",
                     (long long)nchars, INT32_MAX / 2);
        return -1;
    }
    raw->cps = xmalloc((size_t)nchars, sizeof *raw->cps);
    raw->off = xmalloc((size_t)n + 1, sizeof *raw->off);
    raw->count = xmalloc((size_t)n, sizeof *raw->count);
    if (!raw->cps || !raw->off || !raw->count) {
        raw_free(raw);
        PyErr_NoMemory();
        return -1;
    }
    raw->nwords = (int32_t)n;
    raw->off[0] = 0;
    pos = 0;
    while (PyDict_Next(words, &pos, &key, &value)) {
        long long c = PyLong_AsLongLong(value);
        Py_ssize_t len = PyUnicode_GET_LENGTH(key), i;
        int kind = PyUnicode_KIND(key);
        const void *data = PyUnicode_DATA(key);
        if (c == 0 || len == 0) continue;
        for (i = 0; i < len; i++) raw->cps[raw->off[k] + i] = PyUnicode_READ(kind, data, i);
        raw->count[k] = c;
        raw->off[k + 1] = raw->off[k] + len;
        k++;
    }
    return 0;
}

static int cmp_raw_words(const void *ctx, int32_t a, int32_t b)
{
    const RawWords *r = ctx;
    const Py_UCS4 *x = r->cps + r->off[a], *y = r->cps + r->off[b];
    int64_t la = r->off[a + 1] - r->off[a], lb = r->off[b + 1] - r->off[b], n = la < lb ? la : lb, i;
    for (i = 0; i < n; i++)
        if (x[i] != y[i]) return x[i] < y[i] ? -1 : 1;
    return (la > lb) - (la < lb);
}

/* Sorts the words and turns code points into dense character ids (ascending with the code point). */
static int build_corpus(Trainer *t, const RawWords *raw)
{
    int32_t *order = xmalloc((size_t)raw->nwords, sizeof *order), *id_of = NULL;
    int64_t nchars = raw->off[raw->nwords], i, k = 0;
    int32_t w, c;
    int rc = -1;

    if (!order) return -1;
    for (w = 0; w < raw->nwords; w++) order[w] = w;
    if (sort_ids(order, raw->nwords, cmp_raw_words, raw) < 0) goto done;

    id_of = xcalloc(0x110000, sizeof *id_of);
    if (!id_of) goto done;
    for (i = 0; i < nchars; i++) id_of[raw->cps[i]] = 1;
    t->nalpha = 0;
    for (c = 0; c < 0x110000; c++)
        if (id_of[c]) t->nalpha++;
    t->alphabet = xmalloc((size_t)t->nalpha, sizeof *t->alphabet);
    t->text = xmalloc((size_t)(nchars + t->nalpha), sizeof *t->text);
    t->wstart = xmalloc((size_t)raw->nwords + 1, sizeof *t->wstart);
    t->wcount = xmalloc((size_t)raw->nwords, sizeof *t->wcount);
    if (!t->alphabet || !t->text || !t->wstart || !t->wcount) goto done;
    t->space = -1;
    for (c = 0, k = 0; c < 0x110000; c++) {
        if (!id_of[c]) continue;
        if (c == SPACE_MARK) t->space = (int32_t)k;
        t->alphabet[k] = (Py_UCS4)c;
        id_of[c] = (int32_t)k++;
    }
    t->nwords = raw->nwords;
    t->nchars = nchars;
    t->total = 0;
    t->maxwlen = 0;
    for (w = 0, k = 0; w < raw->nwords; w++) {
        int32_t src = order[w];
        int64_t a = raw->off[src], b = raw->off[src + 1];
        t->wstart[w] = k;
        t->wcount[w] = raw->count[src];
        t->total += raw->count[src];
        if (b - a > t->maxwlen) t->maxwlen = (int32_t)(b - a);
        for (i = a; i < b; i++) t->text[k++] = id_of[raw->cps[i]];
    }
    t->wstart[t->nwords] = k;
    for (c = 0; c < t->nalpha; c++) t->text[nchars + c] = c;
    rc = 0;
done:
    free(order), free(id_of);
    return rc;
}

/* ---------------------------------------------------------------- seeds */

/* A suffix of a word reaches to the word end or to the next space mark, whichever comes first
   (pieces never hold a space mark after their first character); ext caps that at maxlen + 1. */
typedef struct {
    const int32_t *text;
    const uint16_t *ext;
} SuffixCtx;

static inline int32_t suffix_key(const SuffixCtx *x, int32_t p, int32_t d)
{
    return d < x->ext[p] ? x->text[p + d] + 1 : 0; /* 0 ends the suffix */
}

static int cmp_int32(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

static int cmp_suffixes(const SuffixCtx *x, int32_t p, int32_t q, int32_t d)
{
    for (;; d++) {
        int32_t a = suffix_key(x, p, d), b = suffix_key(x, q, d);
        if (a != b) return a < b ? -1 : 1;
        if (a == 0) return (p > q) - (p < q); /* equal suffixes: by position */
    }
}

/* Multikey quicksort (Bentley & Sedgewick 1997) of suffix starts, comparing from depth d. */
static void sort_suffixes(const SuffixCtx *x, int32_t *a, int64_t n, int32_t d)
{
    while (n > 1) {
        int64_t lt = 0, i = 0, gt = n;
        int32_t k0, k1, k2, v;
        if (n < 12) {
            int64_t j;
            for (i = 1; i < n; i++) {
                int32_t p = a[i];
                for (j = i; j > 0 && cmp_suffixes(x, a[j - 1], p, d) > 0; j--) a[j] = a[j - 1];
                a[j] = p;
            }
            return;
        }
        k0 = suffix_key(x, a[0], d), k1 = suffix_key(x, a[n / 2], d), k2 = suffix_key(x, a[n - 1], d);
        v = k0 < k1 ? (k1 < k2 ? k1 : (k0 < k2 ? k2 : k0)) : (k0 < k2 ? k0 : (k1 < k2 ? k2 : k1));
        while (i < gt) {
            int32_t k = suffix_key(x, a[i], d), tmp;
            if (k < v) tmp = a[lt], a[lt++] = a[i], a[i++] = tmp;
            else if (k > v) tmp = a[--gt], a[gt] = a[i], a[i] = tmp;
            else i++;
        }
        if (v == 0) { /* a[0..gt) all ended here: equal strings, by position */
            qsort(a, (size_t)gt, sizeof *a, cmp_int32);
            a += gt, n -= gt;
            continue;
        }
        /* recurse into the two smaller parts and loop on the largest: the stack stays O(log n) */
        if (lt >= gt - lt && lt >= n - gt) {
            sort_suffixes(x, a + lt, gt - lt, d + 1);
            sort_suffixes(x, a + gt, n - gt, d);
            n = lt;
        } else if (n - gt >= gt - lt) {
            sort_suffixes(x, a, lt, d);
            sort_suffixes(x, a + lt, gt - lt, d + 1);
            a += gt, n -= gt;
        } else {
            sort_suffixes(x, a, lt, d);
            sort_suffixes(x, a + gt, n - gt, d);
            a += lt, n = gt - lt, d++;
        }
    }
}

typedef struct {
    int32_t pos, len;
    int64_t freq;
} Seed;

typedef struct {
    Seed *v;
    int64_t n, cap;
} SeedVec;

static int seed_push(SeedVec *s, int32_t pos, int32_t len, int64_t freq)
{
    if (s->n == INT32_MAX / 2) return -1; /* seed and piece ids are int32 */
    if (s->n == s->cap) {
        int64_t cap = s->cap ? 2 * s->cap : 1 << 16;
        Seed *v = realloc(s->v, (size_t)cap * sizeof *v);
        if (!v) return -1;
        s->v = v, s->cap = cap;
    }
    s->v[s->n].pos = pos, s->v[s->n].len = len, s->v[s->n].freq = freq;
    s->n++;
    return 0;
}

typedef struct {
    const int32_t *sa;
    const int64_t *weight; /* weight[i]: summed counts of the suffixes sa[0..i) */
    const int32_t *left;   /* left[i]: character before sa[i], or -1 when no piece extends it leftwards */
    const int32_t *lruns;  /* lruns[i]: changes of left[] up to i (each -1 counts as a change) */
    int32_t maxlen;
    int all; /* also the substrings that are not maximal */
} NodeCtx;

/* One node of the (weighted) suffix tree: the string sa[lb][0..h) occurs exactly at sa[lb..rb];
   its parent has depth ph. A maximal node is one whose every one-character extension (right:
   it is a node; left: the characters before its occurrences differ) occurs less often. */
static int emit_node(const NodeCtx *x, SeedVec *out, int32_t h, int64_t lb, int64_t rb, int32_t ph)
{
    int64_t freq = x->weight[rb + 1] - x->weight[lb];
    int32_t len, top = h < x->maxlen ? h : x->maxlen;
    if (freq < 2) return 0;
    if (h >= 2 && h <= x->maxlen) {
        int left_maximal = x->left[lb] < 0 || x->lruns[rb] != x->lruns[lb];
        if ((left_maximal || x->all) && seed_push(out, x->sa[lb], h, freq) < 0) return -1;
    }
    if (x->all) {
        for (len = ph + 1 > 2 ? ph + 1 : 2; len <= top && len < h; len++)
            if (seed_push(out, x->sa[lb], len, freq) < 0) return -1;
    }
    return 0;
}

static int enumerate_nodes(const NodeCtx *x, const uint16_t *lcp, const uint16_t *ext, int64_t n, SeedVec *out)
{
    /* bottom-up traversal of the lcp intervals (Abouelhoda et al. 2004) */
    typedef struct {
        int32_t h;
        int64_t lb;
    } Frame;
    Frame *stack = xmalloc((size_t)(MAX_PIECE_LENGTH + 3), sizeof *stack);
    int64_t i, top = 0;
    int rc = 0;
    if (!stack) return -1;
    stack[0].h = 0, stack[0].lb = 0;
    for (i = 1; i <= n && rc == 0; i++) {
        int32_t l = lcp[i]; /* lcp[n] = 0 */
        int64_t lb = i - 1;
        while (l < stack[top].h && rc == 0) {
            Frame f = stack[top--];
            int32_t ph = l > stack[top].h ? l : stack[top].h;
            rc = emit_node(x, out, f.h, f.lb, i - 1, ph);
            lb = f.lb;
        }
        if (l > stack[top].h) stack[++top].h = l, stack[top].lb = lb;
    }
    for (i = 0; i < n && rc == 0; i++) { /* leaves: a suffix longer than both neighbour lcps */
        int32_t ph = lcp[i] > lcp[i + 1] ? lcp[i] : lcp[i + 1];
        if (ext[x->sa[i]] > ph) rc = emit_node(x, out, ext[x->sa[i]], i, i, ph);
    }
    free(stack);
    return rc;
}

typedef struct {
    const Seed *seeds;
    const int32_t *text;
} SeedOrder;

static int cmp_seeds(const void *ctx, int32_t a, int32_t b)
{
    const SeedOrder *o = ctx;
    const Seed *x = o->seeds + a, *y = o->seeds + b;
    double sx = (double)x->freq * x->len, sy = (double)y->freq * y->len;
    if (sx != sy) return sx > sy ? -1 : 1;
    return cmp_slices(o->text + x->pos, x->len, o->text + y->pos, y->len);
}

/* Seeds: every character, plus the top seed_size maximal substrings (length 2..maxlen, frequency
   >= 2) by frequency x length; all substrings when the maximal ones cannot fill vocab_size. */
static int make_seeds(Trainer *t, int32_t maxlen, int64_t seed_size, int64_t vocab_size)
{
    int64_t n = t->nchars, i;
    int32_t cap = maxlen + 1, w;
    uint16_t *ext = xmalloc((size_t)n + 1, sizeof *ext), *lcp = xmalloc((size_t)n + 1, sizeof *lcp);
    int32_t *sa = xmalloc((size_t)n + 1, sizeof *sa), *wof = xmalloc((size_t)n + 1, sizeof *wof);
    int32_t *left = xmalloc((size_t)n + 1, sizeof *left), *lruns = xmalloc((size_t)n + 1, sizeof *lruns);
    int64_t *weight = xmalloc((size_t)n + 1, sizeof *weight), *charfreq = xcalloc((size_t)t->nalpha, sizeof *charfreq);
    int32_t *order = NULL;
    SeedVec seeds = {NULL, 0, 0};
    SuffixCtx sx;
    NodeCtx nx;
    double sum = 0.0;
    int64_t keep;
    int rc = -1;

    if (!ext || !lcp || !sa || !wof || !left || !lruns || !weight || !charfreq) goto done;
    for (w = 0; w < t->nwords; w++) {
        int64_t a = t->wstart[w], b = t->wstart[w + 1], p;
        for (p = b - 1; p >= a; p--) {
            int32_t e = (p + 1 < b && t->text[p + 1] != t->space) ? ext[p + 1] + 1 : 1;
            ext[p] = (uint16_t)(e < cap ? e : cap);
            wof[p] = w;
            charfreq[t->text[p]] += t->wcount[w];
        }
    }
    for (i = 0; i < n; i++) sa[i] = (int32_t)i;
    sx.text = t->text, sx.ext = ext;
    sort_suffixes(&sx, sa, n, 0);

    lcp[0] = 0, lcp[n] = 0, weight[0] = 0;
    for (i = 0; i < n; i++) {
        int32_t p = sa[i], d = 0;
        if (i > 0) {
            int32_t q = sa[i - 1], m = ext[p] < ext[q] ? ext[p] : ext[q];
            while (d < m && t->text[p + d] == t->text[q + d]) d++;
            lcp[i] = (uint16_t)d;
        }
        weight[i + 1] = weight[i] + t->wcount[wof[p]];
        left[i] = (p == t->wstart[wof[p]] || t->text[p] == t->space) ? -1 : t->text[p - 1];
        lruns[i] = i == 0 ? 0 : lruns[i - 1] + (left[i] < 0 || left[i] != left[i - 1]);
    }
    nx.sa = sa, nx.weight = weight, nx.left = left, nx.lruns = lruns, nx.maxlen = maxlen, nx.all = 0;
    if (enumerate_nodes(&nx, lcp, ext, n, &seeds) < 0) goto done;
    if (seeds.n + t->nalpha < vocab_size) {
        seeds.n = 0, nx.all = 1;
        if (enumerate_nodes(&nx, lcp, ext, n, &seeds) < 0) goto done;
    }

    order = xmalloc((size_t)seeds.n, sizeof *order);
    if (!order) goto done;
    for (i = 0; i < seeds.n; i++) order[i] = (int32_t)i;
    {
        SeedOrder so;
        so.seeds = seeds.v, so.text = t->text;
        if (sort_ids(order, seeds.n, cmp_seeds, &so) < 0) goto done;
    }
    keep = seeds.n < seed_size ? seeds.n : seed_size;

    t->npieces = (int32_t)(t->nalpha + keep);
    t->poff = xmalloc((size_t)t->npieces, sizeof *t->poff);
    t->plen = xmalloc((size_t)t->npieces, sizeof *t->plen);
    t->pword = xmalloc((size_t)t->npieces, sizeof *t->pword);
    t->pat = xmalloc((size_t)t->npieces, sizeof *t->pat);
    t->logp = xmalloc((size_t)t->npieces, sizeof *t->logp);
    t->prob = xmalloc((size_t)t->npieces, sizeof *t->prob);
    t->expected = xmalloc((size_t)t->npieces, sizeof *t->expected);
    t->alive = xmalloc((size_t)t->npieces, sizeof *t->alive);
    t->scored = xmalloc((size_t)t->npieces, sizeof *t->scored);
    if (!t->poff || !t->plen || !t->pword || !t->pat || !t->logp || !t->prob || !t->expected || !t->alive || !t->scored)
        goto done;
    for (i = 0; i < t->nalpha; i++) {
        t->poff[i] = t->nchars + i, t->plen[i] = 1, t->pword[i] = -1, t->pat[i] = 0;
        t->logp[i] = (double)charfreq[i]; /* the score, for now */
    }
    for (i = 0; i < keep; i++) {
        const Seed *s = seeds.v + order[i];
        int64_t id = t->nalpha + i;
        t->poff[id] = s->pos, t->plen[id] = s->len, t->pword[id] = wof[s->pos];
        t->pat[id] = (int32_t)(s->pos - t->wstart[wof[s->pos]]);
        t->logp[id] = (double)s->freq * s->len;
    }
    for (i = 0; i < t->npieces; i++) sum += t->logp[i];
    for (i = 0; i < t->npieces; i++) {
        t->logp[i] = log(t->logp[i]) - log(sum);
        t->alive[i] = 1, t->scored[i] = 1;
    }
    t->nalive = t->npieces;
    rc = 0;
done:
    free(ext), free(lcp), free(sa), free(wof), free(left), free(lruns), free(weight), free(charfreq);
    free(order), free(seeds.v);
    return rc;
}

static int cmp_piece_strings(const void *ctx, int32_t a, int32_t b)
{
    const Trainer *t = ctx;
    return cmp_slices(t->text + t->poff[a], t->plen[a], t->text + t->poff[b], t->plen[b]);
}

static int rank_strings(Trainer *t)
{
    int32_t *ids = xmalloc((size_t)t->npieces, sizeof *ids), i;
    t->srank = xmalloc((size_t)t->npieces, sizeof *t->srank);
    if (!ids || !t->srank) {
        free(ids);
        return -1;
    }
    for (i = 0; i < t->npieces; i++) ids[i] = i;
    if (sort_ids(ids, t->npieces, cmp_piece_strings, t) < 0) {
        free(ids);
        return -1;
    }
    for (i = 0; i < t->npieces; i++) t->srank[ids[i]] = i;
    free(ids);
    return 0;
}

/* ---------------------------------------------------------------- trie and lattice */

/* A trie over character ids with its children in one open-addressing table keyed (node, char). */
typedef struct {
    uint64_t *keys; /* ((node << 21) | char) + 1; 0 marks an empty slot */
    int32_t *child;
    int32_t *piece; /* piece ending at the node, or -1 */
    uint64_t mask;
    int shift;
    int32_t nnodes;
} Trie;

static inline uint64_t trie_slot(const Trie *tr, uint64_t key)
{
    return (key * 0x9E3779B97F4A7C15ull) >> tr->shift;
}

static inline int32_t trie_child(const Trie *tr, int32_t node, int32_t c)
{
    uint64_t key = (((uint64_t)node << 21) | (uint64_t)c) + 1, s = trie_slot(tr, key);
    for (;; s = (s + 1) & tr->mask) {
        if (tr->keys[s] == key) return tr->child[s];
        if (tr->keys[s] == 0) return -1;
    }
}

static void trie_free(Trie *tr)
{
    free(tr->keys), free(tr->child), free(tr->piece);
}

static int trie_build(Trie *tr, const Trainer *t)
{
    int64_t total = 1, size = 2, i;
    int bits = 1;
    int32_t id;
    memset(tr, 0, sizeof *tr);
    for (id = 0; id < t->npieces; id++) total += t->plen[id];
    if (total > INT32_MAX) return -1; /* node ids are int32 */
    while (size < 2 * total) size <<= 1, bits++;
    tr->mask = (uint64_t)size - 1, tr->shift = 64 - bits;
    tr->keys = xcalloc((size_t)size, sizeof *tr->keys);
    tr->child = xmalloc((size_t)size, sizeof *tr->child);
    tr->piece = xmalloc((size_t)total, sizeof *tr->piece);
    if (!tr->keys || !tr->child || !tr->piece) return -1;
    tr->nnodes = 1, tr->piece[0] = -1;
    for (id = 0; id < t->npieces; id++) {
        const int32_t *s = t->text + t->poff[id];
        int32_t node = 0;
        for (i = 0; i < t->plen[id]; i++) {
            uint64_t key = (((uint64_t)node << 21) | (uint64_t)s[i]) + 1, slot = trie_slot(tr, key);
            while (tr->keys[slot] != 0 && tr->keys[slot] != key) slot = (slot + 1) & tr->mask;
            if (tr->keys[slot] == 0) {
                tr->keys[slot] = key, tr->child[slot] = tr->nnodes;
                tr->piece[tr->nnodes++] = -1;
            }
            node = tr->child[slot];
        }
        tr->piece[node] = id;
    }
    return 0;
}

typedef struct {
    const Trie *trie;
    Edge *edges[MAX_THREADS]; /* per share */
    int64_t nedges[MAX_THREADS];
    int failed[MAX_THREADS];
} LatticeJob;

static void lattice_share(Trainer *t, void *arg, int tid)
{
    LatticeJob *job = arg;
    int32_t lo = (int32_t)((int64_t)t->nwords * tid / t->nthreads), hi = (int32_t)((int64_t)t->nwords * (tid + 1) / t->nthreads), w;
    int64_t n = 0, cap = 1 << 16;
    Edge *e = xmalloc((size_t)cap, sizeof *e);
    if (!e) {
        job->failed[tid] = 1;
        return;
    }
    for (w = lo; w < hi; w++) {
        const int32_t *s = t->text + t->wstart[w];
        int32_t len = (int32_t)(t->wstart[w + 1] - t->wstart[w]), from, j;
        t->wedge[w] = n; /* relative to the share for now */
        for (from = 0; from < len; from++) {
            int32_t node = 0;
            for (j = from; j < len; j++) {
                node = trie_child(job->trie, node, s[j]);
                if (node < 0) break;
                if (job->trie->piece[node] < 0) continue;
                if (n == cap) {
                    Edge *grown = realloc(e, (size_t)(2 * cap) * sizeof *e);
                    if (!grown) {
                        free(e);
                        job->failed[tid] = 1;
                        return;
                    }
                    e = grown, cap *= 2;
                }
                e[n].piece = job->trie->piece[node], e[n].from = from;
                n++;
            }
        }
    }
    job->edges[tid] = e, job->nedges[tid] = n;
}

/* Every occurrence of every piece in every word, found by walking the trie from each start. */
static int build_lattice(Trainer *t)
{
    Trie tr;
    LatticeJob job;
    int64_t off = 0;
    int k, rc = -1;

    memset(&tr, 0, sizeof tr);
    memset(&job, 0, sizeof job);
    t->wedge = xmalloc((size_t)t->nwords + 1, sizeof *t->wedge);
    if (!t->wedge || trie_build(&tr, t) < 0) goto done;
    job.trie = &tr;
    parallel(t, lattice_share, &job);
    for (k = 0; k < t->nthreads; k++) {
        if (job.failed[k]) goto done;
        off += job.nedges[k];
    }
    t->nedges = off;
    t->edges = xmalloc((size_t)off, sizeof *t->edges);
    t->post = xmalloc((size_t)off, sizeof *t->post);
    if (!t->edges || !t->post) goto done;
    for (k = 0, off = 0; k < t->nthreads; k++) {
        int32_t lo = (int32_t)((int64_t)t->nwords * k / t->nthreads), hi = (int32_t)((int64_t)t->nwords * (k + 1) / t->nthreads), w;
        memcpy(t->edges + off, job.edges[k], (size_t)job.nedges[k] * sizeof *t->edges);
        for (w = lo; w < hi; w++) t->wedge[w] += off;
        off += job.nedges[k];
    }
    t->wedge[t->nwords] = off;
    rc = 0;
done:
    for (k = 0; k < MAX_THREADS; k++) free(job.edges[k]);
    trie_free(&tr);
    return rc;
}

/* Drops the edges of dead pieces (keeping the order) and refreshes prob = exp(logp). */
static void compact_lattice(Trainer *t)
{
    int64_t e, k = 0;
    int32_t w, i;
    for (w = 0; w < t->nwords; w++) {
        int64_t a = t->wedge[w], b = t->wedge[w + 1];
        t->wedge[w] = k;
        for (e = a; e < b; e++)
            if (t->alive[t->edges[e].piece]) t->edges[k++] = t->edges[e];
    }
    t->wedge[t->nwords] = k;
    t->nedges = k;
    for (i = 0; i < t->npieces; i++) t->prob[i] = t->alive[i] ? exp(t->logp[i]) : 0.0;
}

/* ---------------------------------------------------------------- EM */

static double log_add(double a, double b)
{
    if (a == -INFINITY) return b;
    if (b == -INFINITY) return a;
    return a > b ? a + log1p(exp(b - a)) : b + log1p(exp(a - b));
}

typedef struct {
    double *scratch[MAX_THREADS]; /* alpha and beta of one word */
} EJob;

/* Forward-backward on each word of the share; post[e] = count x posterior of edge e. */
static void estep_share(Trainer *t, void *arg, int tid)
{
    EJob *job = arg;
    double *alpha = job->scratch[tid], *beta = alpha + t->maxwlen + 1;
    int32_t lo, hi, w, j;
    lo = share_start(t, tid), hi = share_start(t, tid + 1);
    for (w = lo; w < hi; w++) {
        const Edge *E = t->edges;
        const int32_t *s = t->text + t->wstart[w];
        int32_t n = (int32_t)(t->wstart[w + 1] - t->wstart[w]);
        int64_t a = t->wedge[w], b = t->wedge[w + 1], e;
        double count = (double)t->wcount[w], chars = 0.0;
        for (j = 0; j < n; j++) chars += t->logp[s[j]];
        if (chars > PROB_SPACE_FLOOR) { /* plain doubles: no alpha can underflow */
            double scale;
            for (j = 0; j <= n; j++) alpha[j] = 0.0, beta[j] = 0.0;
            alpha[0] = 1.0, beta[n] = 1.0;
            for (e = a; e < b; e++) alpha[E[e].from + t->plen[E[e].piece]] += alpha[E[e].from] * t->prob[E[e].piece];
            for (e = b - 1; e >= a; e--) beta[E[e].from] += t->prob[E[e].piece] * beta[E[e].from + t->plen[E[e].piece]];
            scale = count / alpha[n];
            for (e = a; e < b; e++)
                t->post[e] = alpha[E[e].from] * t->prob[E[e].piece] * beta[E[e].from + t->plen[E[e].piece]] * scale;
        } else {
            double z;
            for (j = 0; j <= n; j++) alpha[j] = -INFINITY, beta[j] = -INFINITY;
            alpha[0] = 0.0, beta[n] = 0.0;
            for (e = a; e < b; e++) {
                int32_t to = E[e].from + t->plen[E[e].piece];
                alpha[to] = log_add(alpha[to], alpha[E[e].from] + t->logp[E[e].piece]);
            }
            for (e = b - 1; e >= a; e--) {
                int32_t to = E[e].from + t->plen[E[e].piece];
                beta[E[e].from] = log_add(beta[E[e].from], t->logp[E[e].piece] + beta[to]);
            }
            z = alpha[n];
            for (e = a; e < b; e++)
                t->post[e] = count * exp(alpha[E[e].from] + t->logp[E[e].piece] + beta[E[e].from + t->plen[E[e].piece]] - z);
        }
    }
}

static int run_estep(Trainer *t)
{
    EJob job;
    int k, rc = -1;
    int64_t e;
    int32_t i;
    memset(&job, 0, sizeof job);
    for (k = 0; k < t->nthreads; k++)
        if (!(job.scratch[k] = xmalloc(2 * ((size_t)t->maxwlen + 1), sizeof(double)))) goto done;
    parallel(t, estep_share, &job);
    for (i = 0; i < t->npieces; i++) t->expected[i] = 0.0;
    for (e = 0; e < t->nedges; e++) t->expected[t->edges[e].piece] += t->post[e]; /* fixed order */
    rc = 0;
done:
    for (k = 0; k < t->nthreads; k++) free(job.scratch[k]);
    return rc;
}

static int cmp_by_expected(const void *ctx, int32_t a, int32_t b)
{
    const Trainer *t = ctx;
    if (t->expected[a] != t->expected[b]) return t->expected[a] > t->expected[b] ? -1 : 1;
    return (t->srank[a] > t->srank[b]) - (t->srank[a] < t->srank[b]);
}

/* Bayesian M-step (as sentencepiece): logp = digamma(expected) - digamma(sum of expected), after
   dropping the non-character pieces expected less than MIN_EXPECTED -- but never below min_alive
   pieces, so that vocab_size stays reachable. Kept pieces without a usable estimate (characters
   hidden inside longer pieces) score min - UNSCORED_PENALTY. */
static int run_mstep(Trainer *t, int64_t min_alive)
{
    int32_t i, nlow = 0, *low = xmalloc((size_t)t->npieces, sizeof *low);
    double sum = 0.0, dsum, lowest = INFINITY;
    if (!low) return -1;
    for (i = t->nalpha; i < t->npieces; i++)
        if (t->alive[i] && t->expected[i] < MIN_EXPECTED) low[nlow++] = i;
    if (t->nalive - nlow < min_alive) { /* rescue the most expected of the low pieces */
        int64_t rescue = min_alive - (t->nalive - nlow), k;
        if (sort_ids(low, nlow, cmp_by_expected, t) < 0) {
            free(low);
            return -1;
        }
        for (k = rescue; k < nlow; k++) t->alive[low[k]] = 0;
        t->nalive -= (int32_t)(nlow - rescue);
    } else {
        for (i = 0; i < nlow; i++) t->alive[low[i]] = 0;
        t->nalive -= nlow;
    }
    free(low);
    for (i = 0; i < t->npieces; i++)
        if (t->alive[i]) sum += t->expected[i];
    dsum = digamma(sum);
    for (i = 0; i < t->npieces; i++) {
        if (!t->alive[i]) continue;
        t->scored[i] = t->expected[i] >= MIN_EXPECTED;
        if (t->scored[i]) {
            t->logp[i] = digamma(t->expected[i]) - dsum;
            if (t->logp[i] < lowest) lowest = t->logp[i];
        }
    }
    if (lowest == INFINITY) lowest = 0.0;
    for (i = 0; i < t->npieces; i++)
        if (t->alive[i] && !t->scored[i]) t->logp[i] = lowest - UNSCORED_PENALTY;
    for (i = 0, sum = 0.0; i < t->npieces; i++)
        if (t->alive[i]) sum += exp(t->logp[i]);
    if (sum > 1.0) /* the unscored pieces tipped the mass over 1: shift every score alike */
        for (i = 0; i < t->npieces; i++) t->logp[i] -= log(sum);
    return 0;
}

/* ---------------------------------------------------------------- pruning */

typedef struct {
    int64_t *freq[MAX_THREADS];  /* count-weighted uses on best paths */
    int64_t *users[MAX_THREADS]; /* count-weighted words whose best path uses the piece */
    int32_t *stamp[MAX_THREADS];
    double *best[MAX_THREADS];
    int64_t *back[MAX_THREADS];
    double *loss;
    uint8_t *keep; /* no alternative segmentation: always kept */
    double *freqd, *usersd, sumfreq;
} PJob;

static void viterbi_share(Trainer *t, void *arg, int tid)
{
    PJob *job = arg;
    double *best = job->best[tid];
    int64_t *back = job->back[tid], *freq = job->freq[tid], *users = job->users[tid];
    int32_t *stamp = job->stamp[tid], lo, hi, w, j;
    lo = share_start(t, tid), hi = share_start(t, tid + 1);
    for (w = lo; w < hi; w++) {
        const Edge *E = t->edges;
        int32_t n = (int32_t)(t->wstart[w + 1] - t->wstart[w]);
        int64_t a = t->wedge[w], b = t->wedge[w + 1], e;
        for (j = 1; j <= n; j++) best[j] = -INFINITY;
        best[0] = 0.0;
        for (e = a; e < b; e++) {
            int32_t to = E[e].from + t->plen[E[e].piece];
            double v = best[E[e].from] + t->logp[E[e].piece];
            if (v > best[to]) best[to] = v, back[to] = e;
        }
        for (j = n; j > 0; j = E[back[j]].from) {
            int32_t p = E[back[j]].piece;
            freq[p] += t->wcount[w];
            if (stamp[p] != w) stamp[p] = w, users[p] += t->wcount[w];
        }
    }
}

/* For each piece, its best segmentation without itself inside one of its occurrences, and the
   likelihood lost when the piece is replaced by it (Kudo 2018, as sentencepiece computes it). */
static void loss_share(Trainer *t, void *arg, int tid)
{
    PJob *job = arg;
    double *best = job->best[tid];
    int64_t *back = job->back[tid];
    int32_t lo = (int32_t)((int64_t)t->npieces * tid / t->nthreads), hi = (int32_t)((int64_t)t->npieces * (tid + 1) / t->nthreads), i, j;
    for (i = lo; i < hi; i++) {
        const Edge *E = t->edges;
        int32_t w = t->pword[i], at = t->pat[i], len = t->plen[i], nalt = 0;
        int64_t a, b, e;
        double fi = job->freqd[i], alt = 0.0, sum = job->sumfreq;
        job->keep[i] = 0, job->loss[i] = -INFINITY;
        if (!t->alive[i]) continue;
        if (len == 1) {
            job->keep[i] = 1;
            continue;
        }
        a = t->wedge[w], b = t->wedge[w + 1];
        while (a < b) { /* first edge starting at or after at */
            int64_t m = a + (b - a) / 2;
            if (E[m].from < at) a = m + 1;
            else b = m;
        }
        for (j = 1; j <= len; j++) best[j] = -INFINITY;
        best[0] = 0.0;
        for (e = a, b = t->wedge[w + 1]; e < b && E[e].from < at + len; e++) {
            int32_t from = E[e].from - at, to = from + t->plen[E[e].piece];
            double v;
            if (to > len || E[e].piece == i) continue;
            v = best[from] + t->logp[E[e].piece];
            if (v > best[to]) best[to] = v, back[to] = e;
        }
        if (best[len] == -INFINITY) {
            job->keep[i] = 1;
            continue;
        }
        if (fi == 0.0) continue; /* on no best path: the first to go */
        for (j = len; j > 0; j = E[back[j]].from - at) nalt++;
        for (j = len; j > 0; j = E[back[j]].from - at) alt += log(job->freqd[E[back[j]].piece] + fi);
        alt -= nalt * log(sum + fi * (nalt - 1));
        job->loss[i] = job->usersd[i] / (double)t->total * ((log(fi) - log(sum)) - alt);
    }
}

typedef struct {
    const Trainer *t;
    const double *loss;
} LossOrder;

static int cmp_by_loss(const void *ctx, int32_t a, int32_t b)
{
    const LossOrder *o = ctx;
    const Trainer *t = o->t;
    if (o->loss[a] != o->loss[b]) return o->loss[a] > o->loss[b] ? -1 : 1;
    if (t->logp[a] != t->logp[b]) return t->logp[a] > t->logp[b] ? -1 : 1;
    return (t->srank[a] > t->srank[b]) - (t->srank[a] < t->srank[b]);
}

/* Keeps max(desired, nalive x shrink) pieces: those without an alternative, then by loss. */
static int prune(Trainer *t, int64_t desired, double shrink)
{
    PJob job;
    int32_t *cand = NULL, ncand = 0, nkeep = 0, i;
    int64_t target = (int64_t)(t->nalive * shrink), room, k;
    int rc = -1;
    if (target < desired) target = desired;
    if (target >= t->nalive) target = t->nalive - 1; /* shrink within a rounding error of 1 */
    memset(&job, 0, sizeof job);
    job.loss = xmalloc((size_t)t->npieces, sizeof *job.loss);
    job.keep = xmalloc((size_t)t->npieces, sizeof *job.keep);
    job.freqd = xcalloc((size_t)t->npieces, sizeof *job.freqd);
    job.usersd = xcalloc((size_t)t->npieces, sizeof *job.usersd);
    cand = xmalloc((size_t)t->npieces, sizeof *cand);
    if (!job.loss || !job.keep || !job.freqd || !job.usersd || !cand) goto done;
    for (k = 0; k < t->nthreads; k++) {
        job.freq[k] = xcalloc((size_t)t->npieces, sizeof(int64_t));
        job.users[k] = xcalloc((size_t)t->npieces, sizeof(int64_t));
        job.stamp[k] = xmalloc((size_t)t->npieces, sizeof(int32_t));
        job.best[k] = xmalloc((size_t)t->maxwlen + 1, sizeof(double));
        job.back[k] = xmalloc((size_t)t->maxwlen + 1, sizeof(int64_t));
        if (!job.freq[k] || !job.users[k] || !job.stamp[k] || !job.best[k] || !job.back[k]) goto done;
        memset(job.stamp[k], 0xff, (size_t)t->npieces * sizeof(int32_t));
    }
    parallel(t, viterbi_share, &job);
    for (i = 0; i < t->npieces; i++) { /* integer sums: exact in any order */
        int64_t f = 0, u = 0;
        for (k = 0; k < t->nthreads; k++) f += job.freq[k][i], u += job.users[k][i];
        job.freqd[i] = (double)f, job.usersd[i] = (double)u;
        job.sumfreq += (double)f;
    }
    parallel(t, loss_share, &job);
    for (i = 0; i < t->npieces; i++) {
        if (!t->alive[i]) continue;
        if (job.keep[i]) nkeep++;
        else cand[ncand++] = i;
    }
    {
        LossOrder lo;
        lo.t = t, lo.loss = job.loss;
        if (sort_ids(cand, ncand, cmp_by_loss, &lo) < 0) goto done;
    }
    room = target - nkeep;
    for (k = room < 0 ? 0 : room; k < ncand; k++) t->alive[cand[k]] = 0, t->nalive--;
    rc = 0;
done:
    for (k = 0; k < t->nthreads; k++)
        free(job.freq[k]), free(job.users[k]), free(job.stamp[k]), free(job.best[k]), free(job.back[k]);
    free(job.loss), free(job.keep), free(job.freqd), free(job.usersd), free(cand);
    return rc;
}

/* ---------------------------------------------------------------- driver */

static void trainer_free(Trainer *t)
{
    free(t->text), free(t->wstart), free(t->wcount), free(t->alphabet);
    free(t->poff), free(t->plen), free(t->pword), free(t->pat), free(t->srank);
    free(t->logp), free(t->prob), free(t->expected), free(t->alive), free(t->scored);
    free(t->edges), free(t->wedge), free(t->post);
}

static int cmp_final(const void *ctx, int32_t a, int32_t b)
{
    const Trainer *t = ctx;
    if (t->logp[a] != t->logp[b]) return t->logp[a] > t->logp[b] ? -1 : 1;
    return (t->srank[a] > t->srank[b]) - (t->srank[a] < t->srank[b]);
}

typedef struct {
    int64_t vocab_size, seed_size;
    int32_t maxlen, sub_iterations;
    double shrink;
} Options;

/* Steps 1-3 of the outline; on success (*out)[0..*nout) are the chosen piece ids, best first. */
static int train_model(Trainer *t, const Options *o, int32_t **out_ids, int64_t *nout)
{
    int64_t desired = (int64_t)floor(o->vocab_size * 1.1 + 0.5), k, n = 0;
    int32_t i, it, *order = NULL, *out;
    if (make_seeds(t, o->maxlen, o->seed_size, o->vocab_size) < 0 || rank_strings(t) < 0 || build_lattice(t) < 0)
        return -1;
    compact_lattice(t);
    for (;;) {
        for (it = 0; it < o->sub_iterations; it++) {
            if (run_estep(t) < 0) return -1;
            if (run_mstep(t, o->vocab_size) < 0) return -1;
            compact_lattice(t);
        }
        if (t->nalive <= desired) break;
        if (prune(t, desired, o->shrink) < 0) return -1;
        compact_lattice(t);
    }
    /* every character, then the most probable other pieces */
    order = xmalloc((size_t)t->npieces, sizeof *order);
    out = *out_ids = xmalloc((size_t)t->npieces, sizeof *out);
    if (!order || !out) {
        free(order);
        return -1;
    }
    for (i = 0; i < t->nalpha; i++) out[n++] = i;
    for (i = t->nalpha, k = 0; i < t->npieces; i++)
        if (t->alive[i]) order[k++] = i;
    if (sort_ids(order, k, cmp_final, t) < 0) {
        free(order);
        return -1;
    }
    for (i = 0; i < k && n < o->vocab_size; i++) out[n++] = order[i];
    free(order);
    if (sort_ids(out, n, cmp_final, t) < 0) return -1;
    *nout = n;
    return 0;
}

static PyObject *build_result(const Trainer *t, const int32_t *ids, int64_t n)
{
    PyObject *list = PyList_New((Py_ssize_t)n);
    Py_UCS4 buf[MAX_PIECE_LENGTH];
    int64_t k;
    int32_t j;
    if (!list) return NULL;
    for (k = 0; k < n; k++) {
        int32_t id = ids[k];
        PyObject *piece, *item;
        for (j = 0; j < t->plen[id]; j++) buf[j] = t->alphabet[t->text[t->poff[id] + j]];
        piece = PyUnicode_FromKindAndData(PyUnicode_4BYTE_KIND, buf, t->plen[id]);
        item = piece ? Py_BuildValue("(Nd)", piece, t->logp[id]) : NULL;
        if (!item) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)k, item);
    }
    return list;
}

static PyObject *train(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"words", "vocab_size", "max_piece_length", "seed_size", "shrinking_factor",
                             "n_sub_iterations", "threads", NULL};
    PyObject *words, *result = NULL;
    Py_ssize_t vocab_size, max_piece_length = 16, seed_size = 1000000, sub_iterations = 2, threads = 1;
    double shrink = 0.75;
    RawWords raw;
    Trainer t;
    Options o;
    int32_t *ids = NULL;
    int64_t nids = 0;
    int rc;
    (void)self;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "On|$nndnn:train", kwlist, &words, &vocab_size,
                                     &max_piece_length, &seed_size, &shrink, &sub_iterations, &threads))
        return NULL;
    if (vocab_size < 1)
        return PyErr_Format(PyExc_ValueError, "vocab_size must be >= 1, got %zd", vocab_size);
    if (max_piece_length < 1 || max_piece_length > MAX_PIECE_LENGTH)
        return PyErr_Format(PyExc_ValueError, "max_piece_length must be in 1..%d, got %zd", MAX_PIECE_LENGTH,
                            max_piece_length);
    if (seed_size < 1) return PyErr_Format(PyExc_ValueError, "seed_size must be >= 1, got %zd", seed_size);
    if (!(shrink > 0.0 && shrink < 1.0)) {
        PyObject *got = PyFloat_FromDouble(shrink);
        if (got) PyErr_Format(PyExc_ValueError, "shrinking_factor must be in (0, 1), got %R", got);
        Py_XDECREF(got);
        return NULL;
    }
    if (sub_iterations < 1)
        return PyErr_Format(PyExc_ValueError, "n_sub_iterations must be >= 1, got %zd", sub_iterations);
    if (threads < 1) return PyErr_Format(PyExc_ValueError, "threads must be >= 1, got %zd", threads);
    if (threads > MAX_THREADS) threads = MAX_THREADS; /* the result is the same for any count */
    if (gather_words(words, &raw) < 0) return NULL;

    memset(&t, 0, sizeof t);
    t.nthreads = (int)threads;
    o.vocab_size = vocab_size, o.seed_size = seed_size, o.maxlen = (int32_t)max_piece_length;
    o.sub_iterations = (int32_t)sub_iterations, o.shrink = shrink;

    Py_BEGIN_ALLOW_THREADS
    rc = build_corpus(&t, &raw);
    Py_END_ALLOW_THREADS
    raw_free(&raw);
    if (rc < 0) {
        trainer_free(&t);
        return PyErr_NoMemory();
    }
    if (t.nalpha > vocab_size) {
        PyErr_Format(PyExc_ValueError,
                     "vocab_size %zd is smaller than the %d distinct characters in the words; every character "
                     "must be a piece (character coverage 1.0), so ask for at least %d pieces",
                     vocab_size, t.nalpha, t.nalpha);
        trainer_free(&t);
        return NULL;
    }
    if (t.nwords == 0) {
        trainer_free(&t);
        return PyList_New(0);
    }
    Py_BEGIN_ALLOW_THREADS
    rc = train_model(&t, &o, &ids, &nids);
    Py_END_ALLOW_THREADS
    if (rc < 0) PyErr_NoMemory();
    else result = build_result(&t, ids, nids);
    free(ids);
    trainer_free(&t);
    return result;
}

static PyMethodDef methods[] = {
    {"train", (PyCFunction)(void (*)(void))train, METH_VARARGS | METH_KEYWORDS,
     "train(words, vocab_size, *, max_piece_length=16, seed_size=1_000_000, shrinking_factor=0.75,\n"
     "      n_sub_iterations=2, threads=1) -> list[tuple[str, float]]\n\n"
     "Trains a Unigram LM vocabulary from word counts (normalised, pre-tokenised words such as\n"
     "'\\u2581hello' -> 523). Returns vocab_size (piece, log-probability) pairs, fewer only when the\n"
     "words hold fewer distinct substrings, sorted by score descending then piece ascending. Every\n"
     "character of the words is a piece; ValueError when they outnumber vocab_size. The result does\n"
     "not depend on dict order or on threads."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "lmssl._unigram",
    "Native Unigram LM vocabulary trainer (Kudo 2018) over word counts.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__unigram(void) { return PyModule_Create(&module); }
