/* The news fan-out's subscriber in C, an echo routine for the benchmarks, and kinds that
 * exercise the WIT (worker state, a default policy, activation ids). */
#include <stdio.h>

#include "routilux.h"

/* Prints each headline as `[C] headline`. */
static rx_status subscriber(const rx_batch *in) {
    char label[32] = "C", headline[1024];
    rx_config_str("label", label, sizeof label);
    for (size_t i = 0; i < rx_count(in, "news"); i++) {
        if (!rx_get_str(rx_at(in, "news", i), "headline", headline, sizeof headline))
            return rx_fail("item %zu has no string `headline` (under 1 KiB)", i);
        printf("[%s] %s\n", label, headline);
    }
    return RX_OK;
}

/* Adds `step` to the job's `count` for each item; prints and emits the new count. */
static rx_status tally(const rx_batch *in) {
    int64_t step = 1, n;
    rx_config_int("step", &step);
    for (size_t i = 0; i < rx_count(in, "in"); i++) {
        if (!rx_state_add("count", step, &n)) return RX_FAILED;
        printf("[C] %lld\n", (long long)n);
        rx_json *out = rx_object();
        rx_put_int(out, "n", n);
        if (!rx_emit("counted", out)) return RX_FAILED;
    }
    return RX_OK;
}

/* Emits each item it is given on `out`, unchanged. */
static rx_status echo(const rx_batch *in) {
    for (size_t i = 0; i < rx_count(in, "in"); i++)
        if (!rx_emit_item("out", rx_at(in, "in", i))) return RX_FAILED;
    return RX_OK;
}

/* Takes items two at a time (its kind's default policy); prints `[C] N items in ID`. */
static rx_status pairs(const rx_batch *in) {
    char id[256];
    rx_activation_id(id, sizeof id);
    printf("[C] %zu items in %s\n", rx_count(in, "in"), id);
    return RX_OK;
}

RX_PLUGIN(RX_KIND("subscriber", "Prints each headline as `[C] headline`.", subscriber,
                  RX_SLOTS("news"), RX_EVENTS(), "{\"label\": \"C\"}"),
          RX_KIND("tally",
                  "Adds `step` to the job's `count` for each item; prints and emits the new count.",
                  tally, RX_SLOTS("in"), RX_EVENTS(RX_EVENT("counted", "n")), "{\"step\": 1}"),
          RX_KIND("echo", "Emits each item it is given on `out`, unchanged.", echo,
                  RX_SLOTS("in"), RX_EVENTS(RX_EVENT("out")), NULL),
          RX_KIND_WITH_POLICY("pairs", "Takes items two at a time and prints its activation id.",
                              pairs, RX_SLOTS("in"), RX_EVENTS(), NULL, "{\"batch_size\": 2}"));
