/*
 * routilux.c: the C SDK's implementation (see routilux.h) over the bindings `wit-bindgen c`
 * generated from the routilux WIT (plugin.h / plugin.c). Staged and compiled with every C
 * plugin by `routilux build`.
 */
#include "routilux.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "plugin.h"

struct rx_batch {
    const exports_routilux_plugin_routine_list_slot_batch_t *batches;
    const plugin_string_t *message;
};

/* The error of the activation in progress (set by rx_fail / rx_retry / a failed host call). */
static char *rx_error_message;
static bool rx_error_retryable;

static void rx_set_error(bool retryable, const char *fmt, va_list args) {
    va_list copy;
    va_copy(copy, args);
    int n = vsnprintf(NULL, 0, fmt, copy);
    va_end(copy);
    free(rx_error_message);
    rx_error_message = malloc(n > 0 ? (size_t)n + 1 : 1);
    if (!rx_error_message) abort();
    vsnprintf(rx_error_message, n > 0 ? (size_t)n + 1 : 1, fmt, args);
    rx_error_retryable = retryable;
}

static void rx_host_error(const char *what, const char *key, plugin_string_t *err) {
    char *text = malloc(err->len + strlen(what) + strlen(key) + 8);
    if (!text) abort();
    sprintf(text, "%s `%s`: %.*s", what, key, (int)err->len, (const char *)err->ptr);
    plugin_string_free(err);
    free(rx_error_message);
    rx_error_message = text;
    rx_error_retryable = false;
}

rx_status rx_fail(const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    rx_set_error(false, fmt, args);
    va_end(args);
    return RX_FAILED;
}

rx_status rx_retry(const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    rx_set_error(true, fmt, args);
    va_end(args);
    return RX_FAILED;
}

/* ---- batches ------------------------------------------------------------------------- */

static const routilux_plugin_types_slot_batch_t *rx_slot(const rx_batch *in, const char *slot) {
    size_t n = strlen(slot);
    for (size_t i = 0; i < in->batches->len; i++) {
        const plugin_string_t *s = &in->batches->ptr[i].slot;
        if (s->len == n && memcmp(s->ptr, slot, n) == 0) return &in->batches->ptr[i];
    }
    return NULL;
}

size_t rx_count(const rx_batch *in, const char *slot) {
    const routilux_plugin_types_slot_batch_t *b = rx_slot(in, slot);
    return b ? b->ends.len : 0;
}

/* A slot's items are one JSON array text; item i spans from one byte after the previous
   item's end (or after the `[`) to ends[i]. */
rx_item rx_at(const rx_batch *in, const char *slot, size_t i) {
    const routilux_plugin_types_slot_batch_t *b = rx_slot(in, slot);
    if (!b || i >= b->ends.len) return (rx_item){"{}", 2};
    size_t start = i == 0 ? 1 : (size_t)b->ends.ptr[i - 1] + 1;
    size_t end = b->ends.ptr[i];
    if (end > b->items.len || start > end) return (rx_item){"{}", 2};
    return (rx_item){(const char *)b->items.ptr + start, end - start};
}

rx_item rx_message(const rx_batch *in) {
    if (!in->message) return (rx_item){NULL, 0};
    return (rx_item){(const char *)in->message->ptr, in->message->len};
}

/* ---- reading JSON -------------------------------------------------------------------- */

typedef struct {
    const char *p, *end;
} rx_cursor;

static void rx_ws(rx_cursor *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r'))
        c->p++;
}

/* Skips a string starting at the opening quote; false if malformed. */
static bool rx_skip_string(rx_cursor *c) {
    if (c->p >= c->end || *c->p != '"') return false;
    for (c->p++; c->p < c->end; c->p++) {
        if (*c->p == '\\') {
            c->p++;
        } else if (*c->p == '"') {
            c->p++;
            return true;
        }
    }
    return false;
}

/* Skips one JSON value of any type. */
static bool rx_skip_value(rx_cursor *c) {
    rx_ws(c);
    if (c->p >= c->end) return false;
    if (*c->p == '"') return rx_skip_string(c);
    if (*c->p == '{' || *c->p == '[') {
        int depth = 0;
        while (c->p < c->end) {
            char ch = *c->p;
            if (ch == '"') {
                if (!rx_skip_string(c)) return false;
                continue;
            }
            if (ch == '{' || ch == '[') depth++;
            if (ch == '}' || ch == ']') depth--;
            c->p++;
            if (depth == 0) return true;
        }
        return false;
    }
    const char *start = c->p;
    while (c->p < c->end && *c->p != ',' && *c->p != '}' && *c->p != ']' && *c->p != ' ' &&
           *c->p != '\n' && *c->p != '\t' && *c->p != '\r')
        c->p++;
    return c->p > start;
}

static int rx_hex(char ch) {
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}

static bool rx_hex4(const char *p, const char *end, unsigned *out) {
    if (end - p < 4) return false;
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        int h = rx_hex(p[i]);
        if (h < 0) return false;
        v = v << 4 | (unsigned)h;
    }
    *out = v;
    return true;
}

/* Unescapes the JSON string [p, end) (without quotes) into out; false if it does not fit. */
static bool rx_unescape(const char *p, const char *end, char *out, size_t cap) {
    size_t n = 0;
#define RX_PUT(b)                          \
    do {                                   \
        if (n + 1 >= cap) return false;    \
        out[n++] = (char)(b);              \
    } while (0)
    while (p < end) {
        char ch = *p++;
        if (ch != '\\') {
            RX_PUT(ch);
            continue;
        }
        if (p >= end) return false;
        char e = *p++;
        switch (e) {
        case 'n': RX_PUT('\n'); break;
        case 't': RX_PUT('\t'); break;
        case 'r': RX_PUT('\r'); break;
        case 'b': RX_PUT('\b'); break;
        case 'f': RX_PUT('\f'); break;
        case 'u': {
            unsigned cp;
            if (!rx_hex4(p, end, &cp)) return false;
            p += 4;
            if (cp >= 0xd800 && cp < 0xdc00 && end - p >= 6 && p[0] == '\\' && p[1] == 'u') {
                unsigned lo;
                if (rx_hex4(p + 2, end, &lo) && lo >= 0xdc00 && lo < 0xe000) {
                    cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
                    p += 6;
                }
            }
            if (cp < 0x80) {
                RX_PUT(cp);
            } else if (cp < 0x800) {
                RX_PUT(0xc0 | cp >> 6);
                RX_PUT(0x80 | (cp & 63));
            } else if (cp < 0x10000) {
                RX_PUT(0xe0 | cp >> 12);
                RX_PUT(0x80 | (cp >> 6 & 63));
                RX_PUT(0x80 | (cp & 63));
            } else {
                RX_PUT(0xf0 | cp >> 18);
                RX_PUT(0x80 | (cp >> 12 & 63));
                RX_PUT(0x80 | (cp >> 6 & 63));
                RX_PUT(0x80 | (cp & 63));
            }
            break;
        }
        default: RX_PUT(e); break; /* \" \\ \/ */
        }
    }
#undef RX_PUT
    if (cap == 0) return false;
    out[n] = '\0';
    return true;
}

bool rx_get_raw(rx_item item, const char *field, rx_item *out) {
    if (!item.json) return false;
    rx_cursor c = {item.json, item.json + item.len};
    size_t want = strlen(field);
    char key[256];
    rx_ws(&c);
    if (c.p >= c.end || *c.p != '{') return false;
    c.p++;
    for (;;) {
        rx_ws(&c);
        if (c.p >= c.end || *c.p == '}') return false;
        const char *k = c.p;
        if (!rx_skip_string(&c)) return false;
        bool match = false;
        if (c.p - k - 2 == (ptrdiff_t)want && memchr(k + 1, '\\', want) == NULL) {
            match = memcmp(k + 1, field, want) == 0;
        } else if (rx_unescape(k + 1, c.p - 1, key, sizeof key)) {
            match = strcmp(key, field) == 0;
        }
        rx_ws(&c);
        if (c.p >= c.end || *c.p != ':') return false;
        c.p++;
        rx_ws(&c);
        const char *v = c.p;
        if (!rx_skip_value(&c)) return false;
        if (match) {
            *out = (rx_item){v, (size_t)(c.p - v)};
            return true;
        }
        rx_ws(&c);
        if (c.p < c.end && *c.p == ',') c.p++;
    }
}

bool rx_get_str(rx_item item, const char *field, char *out, size_t cap) {
    rx_item v;
    if (!rx_get_raw(item, field, &v) || v.len < 2 || v.json[0] != '"') return false;
    return rx_unescape(v.json + 1, v.json + v.len - 1, out, cap);
}

bool rx_get_num(rx_item item, const char *field, double *out) {
    rx_item v;
    char buf[64];
    if (!rx_get_raw(item, field, &v) || v.len == 0 || v.len >= sizeof buf) return false;
    if (!(v.json[0] == '-' || (v.json[0] >= '0' && v.json[0] <= '9'))) return false;
    memcpy(buf, v.json, v.len);
    buf[v.len] = '\0';
    char *end;
    *out = strtod(buf, &end);
    return *end == '\0';
}

bool rx_get_int(rx_item item, const char *field, int64_t *out) {
    rx_item v;
    char buf[32];
    if (!rx_get_raw(item, field, &v) || v.len == 0 || v.len >= sizeof buf) return false;
    memcpy(buf, v.json, v.len);
    buf[v.len] = '\0';
    char *end;
    long long n = strtoll(buf, &end, 10);
    if (*end != '\0' || end == buf) return false;
    *out = n;
    return true;
}

bool rx_get_bool(rx_item item, const char *field, bool *out) {
    rx_item v;
    if (!rx_get_raw(item, field, &v)) return false;
    if (v.len == 4 && memcmp(v.json, "true", 4) == 0) {
        *out = true;
        return true;
    }
    if (v.len == 5 && memcmp(v.json, "false", 5) == 0) {
        *out = false;
        return true;
    }
    return false;
}

/* ---- building JSON ------------------------------------------------------------------- */

struct rx_json {
    char *buf;
    size_t len, cap;
};

static void rx_append(rx_json *o, const char *s, size_t n) {
    if (o->len + n + 2 > o->cap) {
        size_t cap = o->cap ? o->cap : 64;
        while (o->len + n + 2 > cap) cap *= 2;
        o->buf = realloc(o->buf, cap);
        if (!o->buf) abort();
        o->cap = cap;
    }
    memcpy(o->buf + o->len, s, n);
    o->len += n;
}

static void rx_append_string(rx_json *o, const char *s) {
    rx_append(o, "\"", 1);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        char esc[8];
        switch (*p) {
        case '"': rx_append(o, "\\\"", 2); break;
        case '\\': rx_append(o, "\\\\", 2); break;
        case '\n': rx_append(o, "\\n", 2); break;
        case '\r': rx_append(o, "\\r", 2); break;
        case '\t': rx_append(o, "\\t", 2); break;
        default:
            if (*p < 0x20) {
                snprintf(esc, sizeof esc, "\\u%04x", *p);
                rx_append(o, esc, 6);
            } else {
                rx_append(o, (const char *)p, 1);
            }
        }
    }
    rx_append(o, "\"", 1);
}

rx_json *rx_object(void) {
    rx_json *o = calloc(1, sizeof *o);
    if (!o) abort();
    rx_append(o, "{", 1);
    return o;
}

static void rx_key(rx_json *o, const char *key) {
    if (o->len > 1) rx_append(o, ",", 1);
    rx_append_string(o, key);
    rx_append(o, ":", 1);
}

void rx_put_str(rx_json *o, const char *key, const char *value) {
    rx_key(o, key);
    rx_append_string(o, value);
}

void rx_put_num(rx_json *o, const char *key, double value) {
    char buf[32];
    rx_key(o, key);
    int n = snprintf(buf, sizeof buf, "%.17g", value);
    if (value != value || value - value != 0) n = snprintf(buf, sizeof buf, "null");
    rx_append(o, buf, (size_t)n);
}

void rx_put_int(rx_json *o, const char *key, int64_t value) {
    char buf[32];
    rx_key(o, key);
    rx_append(o, buf, (size_t)snprintf(buf, sizeof buf, "%lld", (long long)value));
}

void rx_put_bool(rx_json *o, const char *key, bool value) {
    rx_key(o, key);
    rx_append(o, value ? "true" : "false", value ? 4 : 5);
}

void rx_put_raw(rx_json *o, const char *key, const char *json, size_t len) {
    rx_key(o, key);
    rx_append(o, json, len);
}

void rx_json_free(rx_json *o) {
    if (!o) return;
    free(o->buf);
    free(o);
}

/* ---- host calls ---------------------------------------------------------------------- */

static plugin_string_t rx_str(const char *s) {
    return (plugin_string_t){(uint8_t *)s, strlen(s)};
}

bool rx_emit_item(const char *event, rx_item item) {
    plugin_string_t ev = rx_str(event), err;
    plugin_string_t payload = {(uint8_t *)item.json, item.len};
    if (routilux_plugin_host_emit(&ev, &payload, &err)) return true;
    rx_host_error("emit", event, &err);
    return false;
}

bool rx_emit(const char *event, rx_json *o) {
    rx_append(o, "}", 1);
    bool ok = rx_emit_item(event, (rx_item){o->buf, o->len});
    rx_json_free(o);
    return ok;
}

/* Copies a host string into out (NUL-terminated) and frees it. */
static bool rx_take(plugin_string_t *s, char *out, size_t cap) {
    bool fits = s->len < cap;
    if (fits) {
        memcpy(out, s->ptr, s->len);
        out[s->len] = '\0';
    }
    plugin_string_free(s);
    return fits;
}

static bool rx_config_raw(const char *key, char *out, size_t cap) {
    plugin_string_t k = rx_str(key), value;
    if (!routilux_plugin_host_config(&k, &value)) return false;
    return rx_take(&value, out, cap);
}

bool rx_config_str(const char *key, char *out, size_t cap) {
    char buf[4096];
    if (!rx_config_raw(key, buf, sizeof buf)) return false;
    size_t n = strlen(buf);
    if (n < 2 || buf[0] != '"') return false;
    return rx_unescape(buf + 1, buf + n - 1, out, cap);
}

bool rx_config_num(const char *key, double *out) {
    char buf[64];
    if (!rx_config_raw(key, buf, sizeof buf)) return false;
    char *end;
    double v = strtod(buf, &end);
    if (end == buf || *end) return false;
    *out = v;
    return true;
}

bool rx_config_int(const char *key, int64_t *out) {
    char buf[64];
    if (!rx_config_raw(key, buf, sizeof buf)) return false;
    char *end;
    long long v = strtoll(buf, &end, 10);
    if (end == buf || *end) return false;
    *out = v;
    return true;
}

bool rx_state_get(const char *key, char *out, size_t cap) {
    plugin_string_t k = rx_str(key), value;
    if (!routilux_plugin_host_state_get(&k, &value)) return false;
    return rx_take(&value, out, cap);
}

bool rx_state_set(const char *key, const char *json) {
    plugin_string_t k = rx_str(key), v = rx_str(json), err;
    if (routilux_plugin_host_state_set(&k, &v, &err)) return true;
    rx_host_error("state", key, &err);
    return false;
}

bool rx_state_add(const char *key, int64_t delta, int64_t *out) {
    plugin_string_t k = rx_str(key), err;
    int64_t value;
    if (routilux_plugin_host_state_add(&k, delta, &value, &err)) {
        if (out) *out = value;
        return true;
    }
    rx_host_error("state", key, &err);
    return false;
}

void rx_log(rx_level level, const char *fmt, ...) {
    char buf[1024];
    va_list args;
    va_start(args, fmt);
    vsnprintf(buf, sizeof buf, fmt, args);
    va_end(args);
    plugin_string_t message = rx_str(buf);
    routilux_plugin_host_log((routilux_plugin_host_level_t)level, &message);
}

void rx_job_id(char *out, size_t cap) {
    plugin_string_t id;
    routilux_plugin_host_job_id(&id);
    if (!rx_take(&id, out, cap) && cap > 0) out[0] = '\0';
}

void rx_activation_id(char *out, size_t cap) {
    plugin_string_t id;
    routilux_plugin_host_activation_id(&id);
    if (!rx_take(&id, out, cap) && cap > 0) out[0] = '\0';
}

/* ---- the component's exports --------------------------------------------------------- */

static size_t rx_count_list(const char *const *list) {
    size_t n = 0;
    while (list && list[n]) n++;
    return n;
}

void exports_routilux_plugin_routine_describe(exports_routilux_plugin_routine_list_routine_kind_t *ret) {
    size_t kinds = 0;
    while (rx_plugin_kinds[kinds].name) kinds++;
    ret->len = kinds;
    ret->ptr = calloc(kinds ? kinds : 1, sizeof *ret->ptr);
    if (!ret->ptr) abort();
    for (size_t k = 0; k < kinds; k++) {
        const rx_kind *spec = &rx_plugin_kinds[k];
        routilux_plugin_types_routine_kind_t *out = &ret->ptr[k];
        plugin_string_dup(&out->name, spec->name);
        plugin_string_dup(&out->description, spec->description ? spec->description : "");
        plugin_string_dup(&out->default_config, spec->config ? spec->config : "{}");
        out->default_policy.is_some = spec->policy != NULL;
        if (spec->policy) plugin_string_dup(&out->default_policy.val, spec->policy);
        size_t slots = rx_count_list(spec->slots);
        out->slots.len = slots;
        out->slots.ptr = calloc(slots ? slots : 1, sizeof *out->slots.ptr);
        if (!out->slots.ptr) abort();
        for (size_t i = 0; i < slots; i++) plugin_string_dup(&out->slots.ptr[i].name, spec->slots[i]);
        size_t events = 0;
        while (spec->events && spec->events[events].name) events++;
        out->events.len = events;
        out->events.ptr = calloc(events ? events : 1, sizeof *out->events.ptr);
        if (!out->events.ptr) abort();
        for (size_t i = 0; i < events; i++) {
            const rx_event_spec *e = &spec->events[i];
            plugin_string_dup(&out->events.ptr[i].name, e->name);
            size_t fields = rx_count_list(e->fields);
            out->events.ptr[i].fields.len = fields;
            out->events.ptr[i].fields.ptr = calloc(fields ? fields : 1, sizeof(plugin_string_t));
            if (!out->events.ptr[i].fields.ptr) abort();
            for (size_t f = 0; f < fields; f++)
                plugin_string_dup(&out->events.ptr[i].fields.ptr[f], e->fields[f]);
        }
    }
}

bool exports_routilux_plugin_routine_activate(
    plugin_string_t *kind, exports_routilux_plugin_routine_list_slot_batch_t *batches,
    plugin_string_t *maybe_message, exports_routilux_plugin_routine_activation_error_t *err) {
    const rx_kind *spec = NULL;
    for (const rx_kind *k = rx_plugin_kinds; k->name; k++) {
        if (strlen(k->name) == kind->len && memcmp(k->name, kind->ptr, kind->len) == 0) {
            spec = k;
            break;
        }
    }
    rx_status status;
    free(rx_error_message);
    rx_error_message = NULL;
    rx_error_retryable = false;
    if (!spec) {
        status = rx_fail("unknown routine kind `%.*s`", (int)kind->len, (const char *)kind->ptr);
    } else {
        rx_batch in = {batches, maybe_message};
        status = spec->activate(&in);
    }
    fflush(stdout);
    plugin_string_free(kind);
    exports_routilux_plugin_routine_list_slot_batch_free(batches);
    if (maybe_message) plugin_string_free(maybe_message);
    if (status == RX_OK) return true;
    plugin_string_dup(&err->message,
                      rx_error_message ? rx_error_message : "the routine returned RX_FAILED");
    err->retryable = rx_error_retryable;
    return false;
}
