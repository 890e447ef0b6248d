/*
 * {{name}}: an audit defense plugin written in C (generated from the C defense template).
 *
 * A template that does not change the model ("onnx-passthrough-check"): it checks that the bytes
 * it is given look like an ONNX ModelProto and hands them back unchanged, with the report
 * {"changed": false, "note": "template: replace defend() with your defense"}.
 * Same behaviour as the Rust defense template.
 *
 * A real defense (fine-pruning, retraining, ...) needs to load, edit and re-export the model; a
 * later SDK version exposes the engine for that. Until then, put your own logic in `defend`.
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

/* JSON Schema of the parameters: this template takes none. */
#define PARAMS_SCHEMA "{\"type\":\"object\",\"additionalProperties\":false,\"properties\":{}}"

static int32_t plugin_run(const AuditRequest *request, AuditResponse *response);
static void plugin_release(AuditResponse *response);

static const AuditPluginDescriptor DESCRIPTOR = {
    .struct_size = (uint32_t)sizeof(AuditPluginDescriptor),
    .kind = AUDIT_KIND_DEFENSE,
    .name = LIT("{{name}}"),
    .version = LIT("0.1.0"),
    .description = LIT("Template defense (onnx-passthrough-check): checks the model is ONNX and "
                       "returns it unchanged; it does not change the model"),
    .params_schema = LIT(PARAMS_SCHEMA),
    .build_info = LIT("C (" COMPILER "), built for ABI v" STRINGIFY(AUDIT_ABI_VERSION)),
    .capabilities = AUDIT_CAP_NEEDS_MODEL,
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
    uint8_t *model;
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
        free(st->model);
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

/* ---- the defense ----------------------------------------------------------------------------- */

/* Checks that `bytes` start like a serialized ONNX ModelProto: the first field key must be one of
 * its fields with the right wire type (a model exported by PyTorch starts with 0x08, ir_version). */
static int looks_like_onnx(const uint8_t *bytes, size_t len) {
    if (len == 0) return 0;
    uint32_t key = bytes[0];
    if (bytes[0] & 0x80) { /* a two-byte varint key: the field numbers of ModelProto need no more */
        if (len < 2 || (bytes[1] & 0x80)) return 0;
        key = (uint32_t)(bytes[0] & 0x7f) | (uint32_t)bytes[1] << 7;
    }
    uint32_t field = key >> 3, wire_type = key & 7;
    switch (field) {
    case 1: /* ir_version */
    case 5: /* model_version */
        return wire_type == 0;
    case 2: /* producer_name */
    case 3: /* producer_version */
    case 4: /* domain */
    case 6: /* doc_string */
    case 7: /* graph */
    case 8: /* opset_import */
    case 14: /* metadata_props */
    case 20: /* training_info */
    case 25: /* functions */
    case 26: /* configuration */
        return wire_type == 2;
    default:
        return 0;
    }
}

static int32_t defend(const AuditRequest *req, AuditResponse *response, State *st) {
    static const char report[] = "{\"changed\":false,\"note\":\"template: replace defend() with your defense\"}";
    const uint8_t *model = req->model.ptr;
    size_t len = model != NULL ? req->model.len : 0;
    if (len == 0)
        return fail(response, st, AUDIT_STATUS_INVALID_INPUT,
                    "the model is empty: pass an ONNX model (--model MODEL.onnx)");
    if (!looks_like_onnx(model, len))
        return fail(response, st, AUDIT_STATUS_INVALID_INPUT,
                    "the model (%zu bytes, first byte 0x%02x) does not look like an ONNX ModelProto", len,
                    (unsigned)model[0]);
    if (cancelled(req->host)) return fail(response, st, AUDIT_STATUS_CANCELLED, "cancelled by the user");
    progress(req->host, "defend", 0, 1);

    st->model = alloc(len);
    st->report = alloc(sizeof(report));
    if (st->model == NULL || st->report == NULL) return fail(response, st, AUDIT_STATUS_FAILED, "out of memory");
    memcpy(st->model, model, len);
    memcpy(st->report, report, sizeof(report));
    response->model.ptr = st->model;
    response->model.len = len;
    response->report_json.ptr = (const uint8_t *)st->report;
    response->report_json.len = sizeof(report) - 1;
    /* No dropped samples: an empty index vector. */
    memset(&response->indices, 0, sizeof(response->indices));
    response->indices.dtype = AUDIT_DTYPE_I64;
    response->indices.ndim = 1;
    progress(req->host, "defend", 1, 1);
    host_log(req->host, AUDIT_LOG_INFO, "model of %zu bytes returned unchanged (template)", len);
    return AUDIT_STATUS_OK;
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
    if (request->op != AUDIT_OP_DEFEND)
        return fail(response, st, AUDIT_STATUS_UNSUPPORTED, "operation %u is not supported by a defense plugin",
                    (unsigned)request->op);
    /* This template ignores the data, but a real defense uses it: check what is there. */
    Images im = {0};
    const AuditDataset *sets[2] = {&request->data, &request->clean};
    const char *names[2] = {"data", "clean"};
    for (int i = 0; i < 2; i++) {
        if (sets[i]->images.ndim == 0 && sets[i]->images.byte_len == 0) continue; /* absent */
        int32_t status = check_dataset(sets[i], names[i], &im, response, st);
        if (status != AUDIT_STATUS_OK) return status;
    }
    return defend(request, response, st);
}
