// `console` for QuickJS, which has none: lines go to WASI standard output and error, which
// the routilux host captures into the job's output. (StarlingMonkey has its own console.)
// Staged beside the SDK by `routilux build` for the QuickJS engine only, and loaded before
// the plugin's own modules.
import stdoutModule from "wasi:cli/stdout@0.2.12";
import stderrModule from "wasi:cli/stderr@0.2.12";
import { utf8Encode as encode } from "./routilux.js";

function show(value) {
  if (typeof value === "string") return value;
  if (value instanceof Error) return value.stack ? `${value}\n${value.stack}` : String(value);
  try {
    const text = JSON.stringify(value);
    return text === undefined ? String(value) : text;
  } catch {
    return String(value);
  }
}

function writer(module, getter) {
  // One handle per instance, fetched on first use (not while the build snapshots the heap).
  let stream = null;
  return (...args) => {
    const line = encode(`${args.map(show).join(" ")}\n`);
    stream ??= module[getter]();
    // blocking-write-and-flush takes at most 4096 bytes at a time.
    for (let at = 0; at < line.length; at += 4096) {
      stream.blockingWriteAndFlush(line.subarray(at, at + 4096));
    }
  };
}

if (typeof globalThis.console === "undefined") {
  const out = writer(stdoutModule, "getStdout");
  const err = writer(stderrModule, "getStderr");
  globalThis.console = { log: out, info: out, debug: out, warn: err, error: err, trace: err };
}
