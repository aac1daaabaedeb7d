// `console` for QuickJS, which has none: lines go to WASI standard output and error, which
// the routilux host captures into the job's output. (StarlingMonkey has its own console.)
// Staged beside the SDK by `routilux build` for the QuickJS engine only, and loaded before
// the plugin's own modules.
import stdoutModule from "wasi:cli/stdout@0.2.12";
import stderrModule from "wasi:cli/stderr@0.2.12";

// UTF-8 for the WASI writes (QuickJS has no TextEncoder; items need none: they are strings).
function encode(s) {
  const n = s.length;
  let out = new Uint8Array(n);
  let at = 0;
  for (let i = 0; i < n; i++) {
    let c = s.charCodeAt(i);
    if (c < 0x80) {
      out[at++] = c;
      continue;
    }
    if (at + 4 * (n - i) > out.length) {
      const bigger = new Uint8Array(at + 4 * (n - i));
      bigger.set(out.subarray(0, at));
      out = bigger;
    }
    if (c >= 0xd800 && c < 0xdc00 && i + 1 < n) {
      const d = s.charCodeAt(i + 1);
      if (d >= 0xdc00 && d < 0xe000) {
        c = 0x10000 + ((c - 0xd800) << 10) + (d - 0xdc00);
        i++;
      }
    }
    if (c < 0x800) {
      out[at++] = 0xc0 | (c >> 6);
      out[at++] = 0x80 | (c & 63);
    } else if (c < 0x10000) {
      out[at++] = 0xe0 | (c >> 12);
      out[at++] = 0x80 | ((c >> 6) & 63);
      out[at++] = 0x80 | (c & 63);
    } else {
      out[at++] = 0xf0 | (c >> 18);
      out[at++] = 0x80 | ((c >> 12) & 63);
      out[at++] = 0x80 | ((c >> 6) & 63);
      out[at++] = 0x80 | (c & 63);
    }
  }
  return at === out.length ? out : out.subarray(0, at);
}

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
