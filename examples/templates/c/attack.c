/*
 * {{name}}: an audit attack plugin written in C (generated from the C attack template).
 *
 * A checkerboard corner-patch backdoor. `poison` stamps a size x size checkerboard of black and
 * white pixels into the top-left corner of every channel of a `poison_rate` share of the training
 * set, chosen deterministically from the call's seed among the samples whose label is not `target`,
 * and relabels them `target`. `trigger` stamps the same patch on every image it is given and asks
 * the model for `target` on all of them. Same behaviour as the Rust attack template.
 *
 * Build: cc -O2 -Wall -Wextra -Werror -std=c11 -fPIC -shared -I{{include_dir}} \
 *            -o lib{{lib_name}}.so plugin.c
 *
 * Ownership (see audit_plugin.h): the request is borrowed for the duration of `run`; everything
 * this plugin puts into the response is malloc'd, hangs off `response->plugin_state`, and is freed
 * by `release`.
 */
#include "audit_plugin.h"

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- descriptor ------------------------------------------------------------------------------ */

#define STRINGIFY_(x) #x
#define STRINGIFY(x) STRINGIFY_(x)
/* An AuditStr view of a string literal. */
#define LIT(s) { (const uint8_t *)(s), sizeof(s) - 1 }

#if defined(__VERSION__)
#define COMPILER __VERSION__
#else
#define COMPILER "unknown compiler"
#endif

/* JSON Schema of the parameters. The host validates every call against it and fills the defaults. */
#define PARAMS_SCHEMA                                                                             \
    "{\"type\":\"object\",\"additionalProperties\":false,\"properties\":{"                        \
    "\"size\":{\"type\":\"integer\",\"default\":4,\"minimum\":1,\"maximum\":64,"                  \
    "\"description\":\"Side in pixels of the checkerboard patch in the top-left corner\"},"       \
    "\"target\":{\"type\":\"integer\",\"default\":0,\"minimum\":0,"                               \
    "\"description\":\"Class that triggered images are sent to\"},"                               \
    "\"poison_rate\":{\"type\":\"number\",\"default\":0.05,\"minimum\":0,\"maximum\":1,"          \
    "\"description\":\"Share of the training set to poison (chosen among samples not already "    \
    "labelled target)\"}}}"

static int32_t plugin_run(const AuditRequest *request, AuditResponse *response);
static void plugin_release(AuditResponse *response);

static const AuditPluginDescriptor DESCRIPTOR = {
    .struct_size = (uint32_t)sizeof(AuditPluginDescriptor),
    .kind = AUDIT_KIND_ATTACK,
    .name = LIT("{{name}}"),
    .version = LIT("0.1.0"),
    .description = LIT("Checkerboard corner-patch backdoor: stamps a size x size black/white "
                       "checkerboard in the top-left corner and relabels to target"),
    .params_schema = LIT(PARAMS_SCHEMA),
    .build_info = LIT("C (" COMPILER "), built for ABI v" STRINGIFY(AUDIT_ABI_VERSION)),
    .capabilities = 0,
    .run = plugin_run,
    .release = plugin_release,
};

/* The only exported symbol: picks ABI v1 when the host offers it. */
int32_t audit_plugin_negotiate(const AuditHostApi *host, AuditNegotiation *out) {
    if (host == NULL || out == NULL) return AUDIT_STATUS_INVALID_INPUT;
    if (out->struct_size < sizeof(AuditNegotiation)) return AUDIT_STATUS_INVALID_INPUT;
    if (host->struct_size < offsetof(AuditHostApi, abi_max) + sizeof(host->abi_max))
        return AUDIT_STATUS_INVALID_INPUT;
    out->abi_version = AUDIT_ABI_VERSION;
    if (host->abi_min > AUDIT_ABI_VERSION || host->abi_max < AUDIT_ABI_VERSION)
        return AUDIT_STATUS_UNSUPPORTED;
    out->descriptor = &DESCRIPTOR;
    return AUDIT_STATUS_OK;
}

/* ---- response ownership ---------------------------------------------------------------------- */

/* Everything a response points to; freed by `plugin_release`. */
typedef struct State {
    char *message;
    char *report;
    void *images;
    int64_t *labels;
    int64_t *indices;
} State;

/* malloc that never returns NULL for a zero size (so NULL always means out of memory). */
static void *alloc(size_t n) { return malloc(n > 0 ? n : 1); }

/* Sets the response message; `status` is returned for convenience. The message is formatted
 * into a buffer owned by `st` when possible, else a static string. */
#if defined(__GNUC__)
__attribute__((format(printf, 4, 5)))
#endif
static int32_t
fail(AuditResponse *response, State *st, int32_t status, const char *fmt, ...) {
    static const char oom[] = "out of memory while formatting an error message";
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    char *buf = n >= 0 ? alloc((size_t)n + 1) : NULL;
    if (buf == NULL) {
        response->message.ptr = (const uint8_t *)oom;
        response->message.len = sizeof(oom) - 1;
        return status;
    }
    va_start(ap, fmt);
    vsnprintf(buf, (size_t)n + 1, fmt, ap);
    va_end(ap);
    free(st->message);
    st->message = buf;
    response->message.ptr = (const uint8_t *)buf;
    response->message.len = (size_t)n;
    return status;
}

static void plugin_release(AuditResponse *response) {
    if (response == NULL) return;
    State *st = response->plugin_state;
    if (st != NULL) {
        free(st->message);
        free(st->report);
        free(st->images);
        free(st->labels);
        free(st->indices);
        free(st);
    }
    uint32_t size = response->struct_size;
    memset(response, 0, sizeof(AuditResponse));
    response->struct_size = size;
}

/* ---- host services (the table and its callbacks may be absent) ------------------------------- */

#define HOST_HAS(h, field) \
    ((h) != NULL && (h)->struct_size >= offsetof(AuditHostApi, field) + sizeof((h)->field) && (h)->field != NULL)

static void progress(const AuditHostApi *host, const char *phase, uint64_t done, uint64_t total) {
    if (HOST_HAS(host, progress)) host->progress(host->ctx, (const uint8_t *)phase, strlen(phase), done, total);
}

#if defined(__GNUC__)
__attribute__((format(printf, 3, 4)))
#endif
static void
host_log(const AuditHostApi *host, uint32_t level, const char *fmt, ...) {
    if (!HOST_HAS(host, log)) return;
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    host->log(host->ctx, level, (const uint8_t *)line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
}

static int cancelled(const AuditHostApi *host) {
    return HOST_HAS(host, is_cancelled) && host->is_cancelled(host->ctx) != 0;
}

/* ---- request checks -------------------------------------------------------------------------- */

/* A checked view of the request's dataset. */
typedef struct Images {
    uint32_t dtype; /* AUDIT_DTYPE_U8 or AUDIT_DTYPE_F32 */
    size_t n, c, h, w;
    const void *pixels;
    size_t byte_len;
    const int64_t *labels;
    uint32_t num_classes;
} Images;

/* Checks `d` (NCHW u8/f32 images, N i64 labels in 0..num_classes) into `out`. Returns a status. */
static int32_t check_dataset(const AuditDataset *d, const char *what, Images *out, AuditResponse *response,
                             State *st) {
    const AuditTensor *im = &d->images, *lb = &d->labels;
    if (im->ndim == 0 && im->byte_len == 0)
        return fail(response, st, AUDIT_STATUS_INVALID_INPUT, "%s: the request carries no images", what);
    if (im->dtype != AUDIT_DTYPE_U8 && im->dtype != AUDIT_DTYPE_F32)
        return fail(response, st, AUDIT_STATUS_INVALID_INPUT, "%s.images: dtype %u is not u8 or f32", what,
                    (unsigned)im->dtype);
    if (im->ndim != 4)
        return fail(response, st, AUDIT_STATUS_INVALID_INPUT, "%s.images: expected NCHW (4 dims), got %u", what,
                    (unsigned)im->ndim);
    size_t elem = im->dtype == AUDIT_DTYPE_U8 ? 1 : sizeof(float);
    size_t dims[4], total = elem;
    for (int i = 0; i < 4; i++) {
        if (im->shape[i] < 0 || (uint64_t)(size_t)im->shape[i] != (uint64_t)im->shape[i])
            return fail(response, st, AUDIT_STATUS_INVALID_INPUT, "%s.images: bad dimension %lld", what,
                        (long long)im->shape[i]);
        dims[i] = (size_t)im->shape[i];
        if (dims[i] != 0 && total > SIZE_MAX / dims[i])
            return fail(response, st, AUDIT_STATUS_INVALID_INPUT, "%s.images: shape overflows", what);
        total *= dims[i];
    }
    if (total != im->byte_len)
        return fail(response, st, AUDIT_STATUS_INVALID_INPUT, "%s.images: byte_len %zu does not match the shape (%zu)",
                    what, im->byte_len, total);
    if (total > 0 && (im->data == NULL || (uintptr_t)im->data % elem != 0))
        return fail(response, st, AUDIT_STATUS_INVALID_INPUT, "%s.images: null or misaligned data", what);
    size_t n = dims[0];
    int no_labels = n == 0 && lb->ndim == 0 && lb->byte_len == 0;
    if (!no_labels && (lb->dtype != AUDIT_DTYPE_I64 || lb->ndim != 1 || lb->shape[0] != (int64_t)n ||
                       lb->byte_len != n * sizeof(int64_t)))
        return fail(response, st, AUDIT_STATUS_INVALID_INPUT, "%s.labels: expected %zu i64 labels", what, n);
    if (n > 0 && (lb->data == NULL || (uintptr_t)lb->data % sizeof(int64_t) != 0))
        return fail(response, st, AUDIT_STATUS_INVALID_INPUT, "%s.labels: null or misaligned data", what);
    const int64_t *labels = lb->data;
    for (size_t i = 0; i < n; i++)
        if (labels[i] < 0 || labels[i] >= (int64_t)d->num_classes)
            return fail(response, st, AUDIT_STATUS_INVALID_INPUT, "%s: label %lld outside 0..%u", what,
                        (long long)labels[i], (unsigned)d->num_classes);
    *out = (Images){im->dtype, dims[0], dims[1], dims[2], dims[3], im->data, im->byte_len, labels, d->num_classes};
    return AUDIT_STATUS_OK;
}

/* ---- parameters ------------------------------------------------------------------------------ */

/* The number stored under "key" in a flat JSON object, or `fallback` when the key is absent.
 * Enough for the host's canonical params (serde_json, compact: {"poison_rate":0.05,"size":4}) and
 * tolerant of spaces; the JSON need not be NUL-terminated. Keys are matched as "key" followed by ':'
 * so a string value that happens to equal a key is not taken for it. When the key is present but
 * its value is not a number, sets *bad_key = key and returns `fallback`. */
static double find_number(const char *json, size_t len, const char *key, double fallback, const char **bad_key) {
    size_t klen = strlen(key);
    for (size_t i = 0; i + klen + 2 <= len; i++) {
        if (json[i] != '"' || memcmp(json + i + 1, key, klen) != 0 || json[i + 1 + klen] != '"') continue;
        if (i > 0 && json[i - 1] == '\\') continue;
        size_t j = i + klen + 2;
        while (j < len && (json[j] == ' ' || json[j] == '\t' || json[j] == '\n' || json[j] == '\r')) j++;
        if (j >= len || json[j] != ':') continue;
        j++;
        while (j < len && (json[j] == ' ' || json[j] == '\t' || json[j] == '\n' || json[j] == '\r')) j++;
        char buf[64];
        size_t m = 0;
        while (j < len && m + 1 < sizeof buf && json[j] != '\0' && strchr("+-0123456789.eE", json[j]) != NULL)
            buf[m++] = json[j++];
        buf[m] = '\0';
        char *end = NULL;
        double v = strtod(buf, &end); /* the host never calls setlocale: '.' is the decimal point */
        if (m == 0 || end != buf + m) {
            *bad_key = key;
            return fallback;
        }
        return v;
    }
    return fallback;
}

typedef struct Settings {
    size_t size;
    int64_t target;
    double poison_rate;
} Settings;

static int32_t read_settings(const AuditRequest *req, const Images *im, Settings *s, AuditResponse *response,
                             State *st) {
    const char *json = (const char *)req->params_json.ptr;
    size_t len = json != NULL ? req->params_json.len : 0;
    const char *bad_key = NULL;
    double size = find_number(json, len, "size", 4, &bad_key);
    double target = find_number(json, len, "target", 0, &bad_key);
    double rate = find_number(json, len, "poison_rate", 0.05, &bad_key);
    if (bad_key != NULL)
        return fail(response, st, AUDIT_STATUS_INVALID_INPUT, "parameter `%s` must be a number", bad_key);
    if (!(size >= 1 && size <= 64) || size != (double)(int)size)
        return fail(response, st, AUDIT_STATUS_INVALID_INPUT, "parameter `size` must be an integer in 1..=64, got %g",
                    size);
    if (!(target >= 0 && target < (double)im->num_classes) || target != (double)(int64_t)target)
        return fail(response, st, AUDIT_STATUS_INVALID_INPUT,
                    "parameter `target` = %g is not a class of this dataset (0..%u)", target,
                    (unsigned)im->num_classes);
    if (!(rate >= 0 && rate <= 1))
        return fail(response, st, AUDIT_STATUS_INVALID_INPUT, "parameter `poison_rate` must lie in 0..=1, got %g",
                    rate);
    s->size = (size_t)size;
    s->target = (int64_t)target;
    s->poison_rate = rate;
    return AUDIT_STATUS_OK;
}

/* ---- the attack ------------------------------------------------------------------------------ */

/* SplitMix64: a tiny, good-enough generator for choosing samples (same sequence as the Rust template). */
static uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += UINT64_C(0x9E3779B97F4A7C15));
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

static int cmp_size(const void *a, const void *b) {
    size_t x = *(const size_t *)a, y = *(const size_t *)b;
    return (x > y) - (x < y);
}

/* Picks k of the m candidates without replacement (partial Fisher-Yates driven by `seed`); the
 * chosen ones end up sorted in candidates[0..k]. */
static void choose(size_t *candidates, size_t m, size_t k, uint64_t seed) {
    uint64_t rng = seed;
    for (size_t i = 0; i < k && i < m; i++) {
        size_t j = i + (size_t)(splitmix64(&rng) % (uint64_t)(m - i));
        size_t t = candidates[i];
        candidates[i] = candidates[j];
        candidates[j] = t;
    }
    qsort(candidates, k < m ? k : m, sizeof(size_t), cmp_size);
}

/* Stamps the checkerboard (white where x + y is even) on image i of `pixels` (layout of `im`). */
static void stamp(void *pixels, const Images *im, size_t i, size_t size) {
    size_t sh = size < im->h ? size : im->h, sw = size < im->w ? size : im->w;
    for (size_t ch = 0; ch < im->c; ch++) {
        size_t base = ((i * im->c) + ch) * im->h * im->w;
        for (size_t y = 0; y < sh; y++)
            for (size_t x = 0; x < sw; x++) {
                int white = (x + y) % 2 == 0;
                size_t at = base + y * im->w + x;
                if (im->dtype == AUDIT_DTYPE_U8)
                    ((uint8_t *)pixels)[at] = white ? 255 : 0;
                else
                    ((float *)pixels)[at] = white ? 1.0f : 0.0f;
            }
    }
}

/* Copies the images and stamps samples which[0..k]; NULL when out of memory or cancelled
 * (then *was_cancelled says which). */
static void *stamped_copy(const AuditRequest *req, const Images *im, const size_t *which, size_t k, size_t size,
                          const char *phase, int *was_cancelled) {
    *was_cancelled = 0;
    void *pixels = alloc(im->byte_len);
    if (pixels == NULL) return NULL;
    if (im->byte_len > 0) memcpy(pixels, im->pixels, im->byte_len);
    for (size_t done = 0; done < k; done++) {
        if (done % 1024 == 0) {
            if (cancelled(req->host)) {
                *was_cancelled = 1;
                free(pixels);
                return NULL;
            }
            progress(req->host, phase, done, k);
        }
        stamp(pixels, im, which == NULL ? done : which[done], size);
    }
    progress(req->host, phase, k, k);
    return pixels;
}

/* Writes a finite double as the shortest JSON number that reads back to the same value. */
static void format_number(char out[32], double v) {
    for (int precision = 1; precision <= 17; precision++) {
        snprintf(out, 32, "%.*g", precision, v);
        if (strtod(out, NULL) == v) return;
    }
}

/* Sets `t` to a view of an owned buffer: the images (same shape as the input) or an i64 vector. */
static void set_images(AuditTensor *t, const AuditTensor *like, void *data) {
    *t = *like;
    t->data = data;
}

static void set_vector(AuditTensor *t, const int64_t *data, size_t n) {
    memset(t, 0, sizeof *t);
    t->dtype = AUDIT_DTYPE_I64;
    t->ndim = 1;
    t->shape[0] = (int64_t)n;
    t->data = data;
    t->byte_len = n * sizeof(int64_t);
}

/* Formats the report JSON into a buffer owned by `st`. */
#if defined(__GNUC__)
__attribute__((format(printf, 3, 4)))
#endif
static int32_t
set_report(AuditResponse *response, State *st, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0 || (st->report = alloc((size_t)n + 1)) == NULL)
        return fail(response, st, AUDIT_STATUS_FAILED, "out of memory");
    va_start(ap, fmt);
    vsnprintf(st->report, (size_t)n + 1, fmt, ap);
    va_end(ap);
    response->report_json.ptr = (const uint8_t *)st->report;
    response->report_json.len = (size_t)n;
    return AUDIT_STATUS_OK;
}

static int32_t poison(const AuditRequest *req, const Images *im, const Settings *s, AuditResponse *response,
                      State *st) {
    size_t *cand = alloc(im->n * sizeof(size_t));
    if (cand == NULL) return fail(response, st, AUDIT_STATUS_FAILED, "out of memory");
    size_t m = 0;
    for (size_t i = 0; i < im->n; i++)
        if (im->labels[i] != s->target) cand[m++] = i;
    size_t k = (size_t)(s->poison_rate * (double)im->n + 0.5);
    if (k > m) {
        host_log(req->host, AUDIT_LOG_WARN, "poison_rate asks for %zu samples but only %zu are not labelled %lld", k,
                 m, (long long)s->target);
        k = m;
    }
    choose(cand, m, k, req->seed);

    int was_cancelled = 0;
    st->images = stamped_copy(req, im, cand, k, s->size, "poison", &was_cancelled);
    st->labels = alloc(im->n * sizeof(int64_t));
    st->indices = alloc(k * sizeof(int64_t));
    if (st->images == NULL || st->labels == NULL || st->indices == NULL) {
        free(cand);
        if (was_cancelled) return fail(response, st, AUDIT_STATUS_CANCELLED, "cancelled by the user");
        return fail(response, st, AUDIT_STATUS_FAILED, "out of memory");
    }
    if (im->n > 0) memcpy(st->labels, im->labels, im->n * sizeof(int64_t));
    for (size_t i = 0; i < k; i++) {
        st->labels[cand[i]] = s->target;
        st->indices[i] = (int64_t)cand[i];
    }
    free(cand);
    host_log(req->host, AUDIT_LOG_INFO, "poisoned %zu of %zu samples", k, im->n);

    set_images(&response->images, &req->data.images, st->images);
    set_vector(&response->labels, st->labels, im->n);
    set_vector(&response->indices, st->indices, k);
    char rate[32];
    format_number(rate, s->poison_rate);
    return set_report(response, st, "{\"poison_rate\":%s,\"poisoned\":%zu,\"size\":%zu,\"target\":%lld}", rate, k,
                      s->size, (long long)s->target);
}

static int32_t trigger(const AuditRequest *req, const Images *im, const Settings *s, AuditResponse *response,
                       State *st) {
    int was_cancelled = 0;
    st->images = stamped_copy(req, im, NULL, im->n, s->size, "trigger", &was_cancelled);
    st->labels = alloc(im->n * sizeof(int64_t));
    if (st->images == NULL || st->labels == NULL) {
        if (was_cancelled) return fail(response, st, AUDIT_STATUS_CANCELLED, "cancelled by the user");
        return fail(response, st, AUDIT_STATUS_FAILED, "out of memory");
    }
    for (size_t i = 0; i < im->n; i++) st->labels[i] = s->target;
    set_images(&response->images, &req->data.images, st->images);
    set_vector(&response->labels, st->labels, im->n);
    return set_report(response, st, "{\"size\":%zu,\"target\":%lld,\"triggered\":%zu}", s->size,
                      (long long)s->target, im->n);
}

static int32_t plugin_run(const AuditRequest *request, AuditResponse *response) {
    static const char oom[] = "out of memory";
    if (request == NULL || response == NULL || response->struct_size < sizeof(AuditResponse))
        return AUDIT_STATUS_INVALID_INPUT;
    State *st = calloc(1, sizeof(State));
    if (st == NULL) {
        response->message.ptr = (const uint8_t *)oom;
        response->message.len = sizeof(oom) - 1;
        return AUDIT_STATUS_FAILED;
    }
    response->plugin_state = st;
    if (request->struct_size < sizeof(AuditRequest))
        return fail(response, st, AUDIT_STATUS_INVALID_INPUT, "request struct_size %u is too small for ABI v1",
                    (unsigned)request->struct_size);
    if (request->op != AUDIT_OP_POISON && request->op != AUDIT_OP_TRIGGER)
        return fail(response, st, AUDIT_STATUS_UNSUPPORTED, "operation %u is not supported by an attack plugin",
                    (unsigned)request->op);
    Images im = {0};
    int32_t status = check_dataset(&request->data, "data", &im, response, st);
    if (status != AUDIT_STATUS_OK) return status;
    Settings s = {0};
    status = read_settings(request, &im, &s, response, st);
    if (status != AUDIT_STATUS_OK) return status;
    if (request->op == AUDIT_OP_POISON) return poison(request, &im, &s, response, st);
    return trigger(request, &im, &s, response, st);
}
