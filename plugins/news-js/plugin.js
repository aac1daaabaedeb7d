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

class Tally extends Routine {
  static description = "Adds `step` to the job's `count` for each item; prints and emits the new count.";
  static slots = ["in"];
  static events = { counted: ["n"] };
  static config = { step: 1 };

  logic(data) {
    for (const _ of data.in) {
      const n = this.addState("count", this.getConfig("step"));
      console.log(`[JS] ${n}`);
      this.emit("counted", { n });
    }
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

class Pairs extends Routine {
  static description = "Takes items two at a time and prints its activation id.";
  static slots = ["in"];
  static defaultPolicy = { batch_size: 2 };
  logic(data) {
    console.log(`[JS] ${data.in.length} items in ${this.activationId}`);
  }
}

export const routine = plugin(Subscriber, Tally, Echo, Pairs);
