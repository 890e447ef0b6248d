/*
 * c-pixel-outlier: an audit detector plugin written in C (generated from the C detector template).
 *
 * A label-conditioned pixel-outlier detector. It inspects the data, not the model: BadNets-style
 * poisoning adds a bright patch to samples that all carry the target label, so those samples have
 * saturated pixels where their class is, on average, dark. Same behaviour as the Rust template:
 *
 * 1. For every class, the per-pixel mean over that class's images (on the 0..255 scale).
 * 2. For every sample, its score: the share of its pixels that are saturated (>= 250) where the
 *    mean of its class is below 127.5. A sample is flagged when its score exceeds `threshold`.
 * 3. A class is a suspected target when its flagged share exceeds `min_share` and exceeds
 *    `outlier_ratio` times the median flagged share of all classes (natural images have some
 *    saturated strokes in every class; set `outlier_ratio` to 0 to drop this condition).
 *
 * The verdict is "backdoored" when some class is suspected. It finds a patch as long as the
 * poisoned samples stay a minority of their target class. Replace `scores` with your own test.
 *
 * Build: cc -O2 -Wall -Wextra -Werror -std=c11 -fPIC -shared -I../../sdk/include \
 *            -o libaudit_plugin_c_pixel_outlier.so plugin.c
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
    "\"threshold\":{\"type\":\"number\",\"default\":0.01,\"minimum\":0,\"maximum\":1,"            \
    "\"description\":\"A sample is flagged when more than this share of its pixels are "          \
    "saturated where its class is dark\"},"                                                       \
    "\"min_share\":{\"type\":\"number\",\"default\":0.01,\"minimum\":0,\"maximum\":1,"            \
    "\"description\":\"A class is suspected when more than this share of its samples are "        \
    "flagged\"},"                                                                                 \
    "\"outlier_ratio\":{\"type\":\"number\",\"default\":2,\"minimum\":0,\"maximum\":1000,"        \
    "\"description\":\"A suspected class must also have more than this multiple of the median "   \
    "flagged share of all classes (0 turns this off)\"}}}"

/* A pixel at least this bright (0..255 scale) is saturated: >= 250, with room for f32 rounding. */
#define SATURATED 249.5
/* A class mean below this (0.5 * 255) is dark. */
#define DARK 127.5
/* Samples between two progress reports and cancellation checks. */
#define STEP 1024

static int32_t plugin_run(const AuditRequest *request, AuditResponse *response);
static void plugin_release(AuditResponse *response);

static const AuditPluginDescriptor DESCRIPTOR = {
    .struct_size = (uint32_t)sizeof(AuditPluginDescriptor),
    .kind = AUDIT_KIND_DETECTOR,
    .name = LIT("c-pixel-outlier"),
    .version = LIT("0.1.0"),
    .description = LIT("Label-conditioned pixel outliers: inspects the data, not the model, "
                       "and flags classes whose samples carry bright patches (BadNets-style)"),
    .params_schema = LIT(PARAMS_SCHEMA),
    .build_info = LIT("C (" COMPILER "), built for ABI v" STRINGIFY(AUDIT_ABI_VERSION)),
    .capabilities = AUDIT_CAP_NEEDS_TRAINING_DATA,
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

/* Writes a finite double as the shortest JSON number that reads back to the same value. */
static void format_number(char out[32], double v) {
    for (int precision = 1; precision <= 17; precision++) {
        snprintf(out, 32, "%.*g", precision, v);
        if (strtod(out, NULL) == v) return;
    }
}

/* Sets `t` to a view of an owned i64 vector. */
static void set_vector(AuditTensor *t, const int64_t *data, size_t n) {
    memset(t, 0, sizeof *t);
    t->dtype = AUDIT_DTYPE_I64;
    t->ndim = 1;
    t->shape[0] = (int64_t)n;
    t->data = data;
    t->byte_len = n * sizeof(int64_t);
}

/* ---- the detector ---------------------------------------------------------------------------- */

/* Pixel `at` of the images on the 0..255 scale. */
static double level(const Images *im, size_t at) {
    if (im->dtype == AUDIT_DTYPE_U8) return (double)((const uint8_t *)im->pixels)[at];
    return (double)((const float *)im->pixels)[at] * 255.0;
}

/* Steps 1 and 2: fills scores[0..n]. Returns a status (OK, CANCELLED, or FAILED when out of memory). */
static int32_t scores(const AuditRequest *req, const Images *im, double *out) {
    size_t n = im->n, per_image = im->c * im->h * im->w, k = im->num_classes;
    if (per_image == 0) {
        for (size_t i = 0; i < n; i++) out[i] = 0;
        return AUDIT_STATUS_OK;
    }
    if (k > SIZE_MAX / sizeof(double) / per_image) return AUDIT_STATUS_FAILED;
    double *means = calloc(k * per_image, sizeof(double));
    size_t *counts = calloc(k > 0 ? k : 1, sizeof(size_t));
    if (means == NULL || counts == NULL) {
        free(means);
        free(counts);
        return AUDIT_STATUS_FAILED;
    }
    for (size_t i = 0; i < n; i++) {
        if (i % STEP == 0) {
            if (cancelled(req->host)) goto cancel;
            progress(req->host, "class means", i, n);
        }
        size_t c = (size_t)im->labels[i];
        counts[c]++;
        double *m = means + c * per_image;
        for (size_t p = 0; p < per_image; p++) m[p] += level(im, i * per_image + p);
    }
    for (size_t c = 0; c < k; c++)
        for (size_t p = 0; p < per_image; p++) means[c * per_image + p] /= (double)(counts[c] > 0 ? counts[c] : 1);
    progress(req->host, "class means", n, n);

    for (size_t i = 0; i < n; i++) {
        if (i % STEP == 0) {
            if (cancelled(req->host)) goto cancel;
            progress(req->host, "scores", i, n);
        }
        const double *m = means + (size_t)im->labels[i] * per_image;
        size_t hits = 0;
        for (size_t p = 0; p < per_image; p++) hits += level(im, i * per_image + p) >= SATURATED && m[p] < DARK;
        out[i] = (double)hits / (double)per_image;
    }
    progress(req->host, "scores", n, n);
    free(means);
    free(counts);
    return AUDIT_STATUS_OK;
cancel:
    free(means);
    free(counts);
    return AUDIT_STATUS_CANCELLED;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* ---- the report: a growing JSON string ------------------------------------------------------- */

typedef struct Buf {
    char *ptr;
    size_t len, cap;
    int oom;
} Buf;

#if defined(__GNUC__)
__attribute__((format(printf, 2, 3)))
#endif
static void
put(Buf *b, const char *fmt, ...) {
    if (b->oom) return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0) {
        b->oom = 1;
        return;
    }
    if (b->len + (size_t)n + 1 > b->cap) {
        size_t cap = b->cap * 2 > b->len + (size_t)n + 1 ? b->cap * 2 : b->len + (size_t)n + 256;
        char *p = realloc(b->ptr, cap);
        if (p == NULL) {
            b->oom = 1;
            return;
        }
        b->ptr = p;
        b->cap = cap;
    }
    va_start(ap, fmt);
    vsnprintf(b->ptr + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

static void put_number(Buf *b, double v) {
    char s[32];
    format_number(s, v);
    put(b, "%s", s);
}

static int32_t scan(const AuditRequest *req, const Images *im, AuditResponse *response, State *st) {
    const char *json = (const char *)req->params_json.ptr;
    size_t len = json != NULL ? req->params_json.len : 0;
    const char *bad_key = NULL;
    double threshold = find_number(json, len, "threshold", 0.01, &bad_key);
    double min_share = find_number(json, len, "min_share", 0.01, &bad_key);
    double outlier_ratio = find_number(json, len, "outlier_ratio", 2, &bad_key);
    if (bad_key != NULL)
        return fail(response, st, AUDIT_STATUS_INVALID_INPUT, "parameter `%s` must be a number", bad_key);

    size_t n = im->n, k = im->num_classes;
    double *score = alloc(n * sizeof(double));
    size_t *samples = calloc(k > 0 ? k : 1, sizeof(size_t));
    size_t *flagged = calloc(k > 0 ? k : 1, sizeof(size_t));
    double *share = calloc(k > 0 ? k : 1, sizeof(double));
    double *sorted = calloc(k > 0 ? k : 1, sizeof(double));
    st->indices = alloc(n * sizeof(int64_t));
    Buf b = {0};
    int32_t status = AUDIT_STATUS_FAILED;
    if (score == NULL || samples == NULL || flagged == NULL || share == NULL || sorted == NULL || st->indices == NULL)
        goto done;
    status = scores(req, im, score);
    if (status != AUDIT_STATUS_OK) goto done;

    /* Step 3: flagged samples, per-class shares, suspected classes. */
    size_t total_flagged = 0;
    for (size_t i = 0; i < n; i++) {
        size_t c = (size_t)im->labels[i];
        samples[c]++;
        if (score[i] > threshold) {
            flagged[c]++;
            st->indices[total_flagged++] = (int64_t)i;
        }
    }
    size_t present = 0;
    for (size_t c = 0; c < k; c++) {
        share[c] = samples[c] > 0 ? (double)flagged[c] / (double)samples[c] : 0.0;
        if (samples[c] > 0) sorted[present++] = share[c];
    }
    qsort(sorted, present, sizeof(double), cmp_double);
    double median = present == 0       ? 0.0
                    : present % 2 == 1 ? sorted[present / 2]
                                       : (sorted[present / 2 - 1] + sorted[present / 2]) / 2.0;

    host_log(req->host, AUDIT_LOG_INFO, "%zu of %zu samples flagged", total_flagged, n);
    put(&b, "{\"backdoored\":");
    size_t suspected = 0;
    for (size_t c = 0; c < k; c++)
        if (samples[c] > 0 && share[c] > min_share && share[c] > outlier_ratio * median) suspected++;
    put(&b, suspected > 0 ? "true" : "false");
    put(&b, ",\"target_classes\":[");
    for (size_t c = 0, first = 1; c < k; c++)
        if (samples[c] > 0 && share[c] > min_share && share[c] > outlier_ratio * median) {
            put(&b, "%s%zu", first ? "" : ",", c);
            first = 0;
        }
    put(&b, "],\"inspects\":\"data\",\"threshold\":");
    put_number(&b, threshold);
    put(&b, ",\"min_share\":");
    put_number(&b, min_share);
    put(&b, ",\"outlier_ratio\":");
    put_number(&b, outlier_ratio);
    put(&b, ",\"samples\":%zu,\"flagged\":%zu,\"samples_per_class\":[", n, total_flagged);
    for (size_t c = 0; c < k; c++) put(&b, "%s%zu", c ? "," : "", samples[c]);
    put(&b, "],\"flagged_per_class\":[");
    for (size_t c = 0; c < k; c++) put(&b, "%s%zu", c ? "," : "", flagged[c]);
    put(&b, "],\"flagged_share_per_class\":[");
    for (size_t c = 0; c < k; c++) {
        put(&b, "%s", c ? "," : "");
        put_number(&b, share[c]);
    }
    put(&b, "],\"median_share\":");
    put_number(&b, median);
    put(&b, "}");
    if (b.oom) {
        status = AUDIT_STATUS_FAILED;
        goto done;
    }
    st->report = b.ptr;
    b.ptr = NULL;
    response->report_json.ptr = (const uint8_t *)st->report;
    response->report_json.len = b.len;
    set_vector(&response->indices, st->indices, total_flagged);
    status = AUDIT_STATUS_OK;
done:
    free(b.ptr);
    free(score);
    free(samples);
    free(flagged);
    free(share);
    free(sorted);
    if (status == AUDIT_STATUS_CANCELLED) return fail(response, st, status, "cancelled by the user");
    if (status != AUDIT_STATUS_OK) return fail(response, st, status, "out of memory");
    return status;
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
    if (request->op != AUDIT_OP_SCAN)
        return fail(response, st, AUDIT_STATUS_UNSUPPORTED, "operation %u is not supported by a detector plugin",
                    (unsigned)request->op);
    if (request->data.images.ndim == 0 && request->data.images.byte_len == 0)
        return fail(response, st, AUDIT_STATUS_INVALID_INPUT,
                    "this detector inspects data, not the model: pass the training data");
    Images im = {0};
    int32_t status = check_dataset(&request->data, "data", &im, response, st);
    if (status != AUDIT_STATUS_OK) return status;
    return scan(request, &im, response, st);
}
