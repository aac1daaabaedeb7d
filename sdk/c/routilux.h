/*
 * routilux.h: write routilux routines in C.
 *
 * A routine kind is a function that receives the slot batches of one activation and returns
 * RX_OK, or rx_fail(...) / rx_retry(...) with a message. The plugin lists its kinds once with
 * RX_PLUGIN:
 *
 *     #include <stdio.h>
 *     #include "routilux.h"
 *
 *     static rx_status shout(const rx_batch *in) {
 *         char text[256];
 *         for (size_t i = 0; i < rx_count(in, "input"); i++) {
 *             if (!rx_get_str(rx_at(in, "input", i), "text", text, sizeof text))
 *                 return rx_fail("item %zu has no string `text`", i);
 *             printf("%s!\n", text);
 *             rx_json *out = rx_object();
 *             rx_put_str(out, "text", text);
 *             if (!rx_emit("output", out)) return RX_FAILED;
 *         }
 *         return RX_OK;
 *     }
 *
 *     RX_PLUGIN(RX_KIND("shout", "shouts each line", shout, RX_SLOTS("input"),
 *                       RX_EVENTS(RX_EVENT("output", "text")), "{}"));
 *
 * Items are JSON objects; rx_get_* read their top-level fields, rx_object/rx_put_* build the
 * items to emit. printf goes to the job's output. Build with `routilux build DIR` (clang
 * --target=wasm32-wasi with the bindings `wit-bindgen c` made from the routilux WIT, then
 * `wasm-tools component new` with the WASI reactor adapter). Instances are pooled and
 * recycled by the host: keep what must last across activations of a job in worker state
 * (rx_state_*), not in globals.
 */
#ifndef ROUTILUX_H
#define ROUTILUX_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* What a routine returns. */
typedef enum { RX_OK = 0, RX_FAILED = 1 } rx_status;

/* One item: a JSON object as UTF-8 text (not NUL-terminated). */
typedef struct {
    const char *json;
    size_t len;
} rx_item;

/* The slot batches of one activation (opaque). */
typedef struct rx_batch rx_batch;

/* How many items `slot` released in this activation (0 for a slot not in it). */
size_t rx_count(const rx_batch *in, const char *slot);
/* The i-th item of `slot`, oldest first (an empty item past the end). */
rx_item rx_at(const rx_batch *in, const char *slot, size_t i);
/* The policy's message (JSON text), or an item with json == NULL if there is none. */
rx_item rx_message(const rx_batch *in);

/* Top-level fields of an item. Each returns false if the field is absent or of another type.
 * rx_get_str unescapes into `out` (NUL-terminated) and fails if it does not fit in `cap`. */
bool rx_get_str(rx_item item, const char *field, char *out, size_t cap);
bool rx_get_num(rx_item item, const char *field, double *out);
bool rx_get_int(rx_item item, const char *field, int64_t *out);
bool rx_get_bool(rx_item item, const char *field, bool *out);
/* The field's value as JSON text (any type), pointing into the item. */
bool rx_get_raw(rx_item item, const char *field, rx_item *out);

/* A JSON object being built for rx_emit. */
typedef struct rx_json rx_json;
rx_json *rx_object(void);
void rx_put_str(rx_json *obj, const char *key, const char *value);
void rx_put_num(rx_json *obj, const char *key, double value);
void rx_put_int(rx_json *obj, const char *key, int64_t value);
void rx_put_bool(rx_json *obj, const char *key, bool value);
/* A value that is already JSON text (e.g. from rx_get_raw). */
void rx_put_raw(rx_json *obj, const char *key, const char *json, size_t len);
/* Frees an object that is not emitted. */
void rx_json_free(rx_json *obj);

/* Routes `obj` (freed) to every slot connected to `event`. On failure (an undeclared event,
 * a halted job) records the error and returns false: return RX_FAILED then. */
bool rx_emit(const char *event, rx_json *obj);
/* Routes an item as it is (e.g. forwarding an input item). */
bool rx_emit_item(const char *event, rx_item item);

/* Config values (the kind's default config with the flow's overrides). */
bool rx_config_str(const char *key, char *out, size_t cap);
bool rx_config_num(const char *key, double *out);
bool rx_config_int(const char *key, int64_t *out);

/* Worker state of this routine in the current job (values are JSON text). */
bool rx_state_get(const char *key, char *out, size_t cap);
bool rx_state_set(const char *key, const char *json);
bool rx_state_add(const char *key, int64_t delta, int64_t *out);

/* A structured log line. */
typedef enum { RX_TRACE, RX_DEBUG, RX_INFO, RX_WARN, RX_ERROR } rx_level;
void rx_log(rx_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* The id of the current job, NUL-terminated into `out`. */
void rx_job_id(char *out, size_t cap);

/* This activation's stable id (JOB/ROUTINE/N, the same for every retry of it), NUL-terminated
 * into `out`: a key that makes an external side effect happen once. */
void rx_activation_id(char *out, size_t cap);

/* Fails the activation with a message; rx_retry says a retry may help. */
rx_status rx_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
rx_status rx_retry(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Declaring the kinds a plugin provides. */
typedef rx_status (*rx_activate_fn)(const rx_batch *in);
typedef struct {
    const char *name;
    const char *const *fields;
} rx_event_spec;
typedef struct {
    const char *name;
    const char *description;
    rx_activate_fn activate;
    const char *const *slots;
    const rx_event_spec *events;
    const char *config; /* default config, a JSON object ("{}" or NULL for none) */
    /* default activation policy in the flow file's form ("\"immediate\"",
     * "{\"batch_size\": 10}", ...), or NULL for immediate; a flow's `policy:` overrides it */
    const char *policy;
} rx_kind;

#define RX_LIST(...) ((const char *const[]){__VA_ARGS__ __VA_OPT__(, ) NULL})
#define RX_SLOTS(...) RX_LIST(__VA_ARGS__)
#define RX_EVENT(name, ...) {name, RX_LIST(__VA_ARGS__)}
#define RX_EVENTS(...) ((const rx_event_spec[]){__VA_ARGS__ __VA_OPT__(, ){NULL, NULL}})
#define RX_KIND(name, description, fn, slots, events, config) \
    {name, description, fn, slots, events, config, NULL}
/* A kind with its own default activation policy (JSON text, as in RX_KIND's doc above). */
#define RX_KIND_WITH_POLICY(name, description, fn, slots, events, config, policy) \
    {name, description, fn, slots, events, config, policy}
/* Lists the plugin's kinds (exactly once per plugin). */
#define RX_PLUGIN(...) const rx_kind rx_plugin_kinds[] = {__VA_ARGS__, {0}}

extern const rx_kind rx_plugin_kinds[];

#ifdef __cplusplus
}
#endif

#endif
