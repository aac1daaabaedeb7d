// The news fan-out's subscriber in JavaScript, and an echo routine for the benchmarks.
import { Routine, plugin } from "./routilux.js";

class Subscriber extends Routine {
  static description = "Prints each headline as `[JS] headline`.";
  static slots = ["news"];
  static config = { label: "JS" };

  logic(data) {
    const label = this.getConfig("label");
    for (const item of data.news) console.log(`[${label}] ${item.headline.trim()}`);
  }
}

class Echo extends Routine {
  static description = "Emits each item it is given on `out`, unchanged.";
  static slots = ["in"];
  static events = ["out"];

  logic(data) {
    for (const item of data.in) this.emit("out", item);
  }
}

export const routine = plugin(Subscriber, Echo);
