// Write routilux routines in JavaScript.
//
// A routine kind is a class: its slots, events and default config as static fields, and a
// `logic` method that receives every slot's items of one activation (`slot -> array of
// objects`) and the activation policy's message. The module exports `routine`, made by
// `plugin(...)` from the kinds it provides:
//
//     import { Routine, plugin } from "./routilux.js";
//
//     class Shout extends Routine {
//       static slots = ["input"];
//       static events = { output: ["text"] };
//       static config = { suffix: "!" };
//       logic(data, message) {
//         for (const item of data.input) {
//           const text = item.text.toUpperCase() + this.getConfig("suffix");
//           console.log(text);
//           this.emit("output", { text });
//         }
//       }
//     }
//
//     export const routine = plugin(Shout);
//
// A kind's default activation policy is its static `defaultPolicy` (the flow file's form, e.g.
// `{ batch_size: 10 }`; a flow's `policy:` overrides it).
//
// `routilux.js` is put beside the plugin's files when it is built; do not copy it in.
// A kind's name is its static `kind` if set, else the class name in snake_case (`Shout` ->
// `shout`); its description is the static `description`. Build with `routilux build DIR`
// (QuickJS by default, `--js-engine starlingmonkey` for SpiderMonkey); this module is the only
// one that touches the generated bindings.
//
// `console.log` goes to the job's output. An exception escaping `logic` fails the activation
// (not retryable; throw `new RoutineError(message, { retryable: true })` when a retry can
// help) and the routine's error strategy decides what happens to its items. Instances are
// pooled and recycled by the host: keep what must last across activations of a job in worker
// state (`getState` / `setState` / `addState`), not in fields.

import * as hostModule from "routilux:plugin/host@0.4.0";

// QuickJS exposes an import as the default export's members, StarlingMonkey as named exports.
const host = hostModule.default ?? hostModule;

const LEVELS = ["trace", "debug", "info", "warn", "error"];

// A WIT s64 is a number in QuickJS's bindings and a BigInt in StarlingMonkey's (which has
// TextEncoder; QuickJS has not).
const s64 = typeof TextEncoder === "function" ? BigInt : Number;

/** Fails the activation with `message`; `retryable` says whether a retry can help. */
export class RoutineError extends Error {
  constructor(message, { retryable = false } = {}) {
    super(message);
    this.name = "RoutineError";
    this.retryable = retryable;
  }
}

function hostError(what, e) {
  const detail = e && typeof e === "object" && "payload" in e ? e.payload : e;
  return new RoutineError(`${what}: ${detail}`);
}

/** Base class of a routine kind. */
export class Routine {
  /** One activation: `data` maps each slot to its items, oldest first. */
  logic(_data, _message) {
    throw new Error(`routine kind \`${this.constructor.kindName}\` has no logic method`);
  }

  /** Routes an item (an object) to every slot connected to `event`. */
  emit(event, item = {}) {
    if (item === null || typeof item !== "object" || Array.isArray(item)) {
      throw new TypeError(`emit \`${event}\`: an item is an object`);
    }
    try {
      host.emit(event, JSON.stringify(item));
    } catch (e) {
      throw hostError(`emit \`${event}\``, e);
    }
  }

  /** The config value under `key` (the kind's default with the flow's overrides). */
  getConfig(key, fallback = undefined) {
    const text = host.config(key);
    return text == null ? fallback : JSON.parse(text);
  }

  /** This routine's worker state under `key` in the current job. */
  getState(key, fallback = undefined) {
    const text = host.stateGet(key);
    return text == null ? fallback : JSON.parse(text);
  }

  /** Sets worker state `key` to `value` (anything JSON can hold). */
  setState(key, value) {
    try {
      host.stateSet(key, JSON.stringify(value));
    } catch (e) {
      throw hostError(`state \`${key}\``, e);
    }
  }

  /** Atomically adds `delta` to the integer under `key`; returns the new value. */
  addState(key, delta = 1) {
    try {
      return Number(host.stateAdd(key, s64(delta)));
    } catch (e) {
      throw hostError(`state \`${key}\``, e);
    }
  }

  /** Atomically sets `key` to `value` if it holds `expected` (`null`: absent). */
  compareAndSwapState(key, expected, value) {
    try {
      return host.stateCompareAndSwap(
        key,
        expected == null ? null : JSON.stringify(expected),
        JSON.stringify(value),
      );
    } catch (e) {
      throw hostError(`state \`${key}\``, e);
    }
  }

  /** A structured log line (level: trace, debug, info, warn or error). */
  log(level, message) {
    if (!LEVELS.includes(level)) throw new Error(`unknown log level \`${level}\``);
    host.log(level, String(message));
  }

  /** The id of the job this activation belongs to. */
  get jobId() {
    return host.jobId();
  }

  /** This activation's stable id (`JOB/ROUTINE/N`): every retry of it sees the same one. */
  get activationId() {
    return host.activationId();
  }

  static get kindName() {
    if (Object.hasOwn(this, "kind")) return this.kind;
    // Acronyms stay whole: `SMSSubscriber` -> `sms_subscriber`.
    return this.name
      .replace(/([a-z0-9])([A-Z])/g, "$1_$2")
      .replace(/([A-Z])([A-Z][a-z])/g, "$1_$2")
      .toLowerCase();
  }
}

function specOf(cls) {
  const slots = cls.slots ?? [];
  const events = cls.events ?? [];
  return {
    name: cls.kindName,
    description: cls.description ?? "",
    slots: Array.isArray(slots)
      ? slots.map((name) => ({ name, maxQueueLength: null }))
      : Object.entries(slots).map(([name, n]) => ({ name, maxQueueLength: n ?? null })),
    events: Array.isArray(events)
      ? events.map((name) => ({ name, fields: [] }))
      : Object.entries(events).map(([name, fields]) => ({ name, fields: [...fields] })),
    defaultConfig: JSON.stringify(cls.config ?? {}),
    // The kind's policy when a flow sets none, in the flow file's form (`"immediate"`,
    // `{ batch_size: 10 }`, `{ time_interval: "500ms" }`).
    defaultPolicy: cls.defaultPolicy == null ? null : JSON.stringify(cls.defaultPolicy),
  };
}

/** The component's `routine` export, providing the given routine kinds. */
export function plugin(...kinds) {
  const byName = new Map();
  for (const cls of kinds) {
    if (!(cls.prototype instanceof Routine)) {
      throw new TypeError(`plugin(...): ${cls.name ?? cls} does not extend Routine`);
    }
    if (byName.has(cls.kindName)) {
      throw new TypeError(`routine kind \`${cls.kindName}\` is defined twice`);
    }
    byName.set(cls.kindName, { cls, instance: null });
  }
  return {
    describe() {
      return [...byName.values()].map(({ cls }) => specOf(cls));
    },
    activate(kind, batches, message) {
      const entry = byName.get(kind);
      if (!entry) throw { message: `unknown routine kind \`${kind}\``, retryable: false };
      entry.instance ??= new entry.cls();
      try {
        const data = {};
        // Each slot's items come as one JSON array: one parse for the whole batch.
        for (const b of batches) data[b.slot] = JSON.parse(b.items);
        entry.instance.logic(data, message == null ? null : JSON.parse(message));
      } catch (e) {
        if (e instanceof RoutineError) throw { message: e.message, retryable: e.retryable };
        const where = e && e.stack ? `\n${e.stack}` : "";
        console.error(`${e && e.name ? e.name : "Error"}: ${e && e.message}${where}`);
        throw { message: `${e && e.name ? e.name : "Error"}: ${e && e.message}`, retryable: false };
      }
    },
  };
}
