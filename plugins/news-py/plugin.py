"""The news fan-out's subscriber in Python, and an echo routine for the benchmarks."""

import json
import os

from routilux import Routine


class Subscriber(Routine):
    """Prints each headline as `[PY] headline`; aborts (a real trap) on `trap_on`."""

    slots = ["news"]
    config = {"label": "PY", "trap_on": None}

    def logic(self, data, message):
        trap_on = self.get_config("trap_on")
        for item in data["news"]:
            headline = item["headline"]
            if trap_on and trap_on in headline:
                os.abort()
            print(f"[{self.get_config('label')}] {headline}")


class Tally(Routine):
    """Adds `step` to the job's `count` for each item; prints and emits the new count."""

    slots = ["in"]
    events = {"counted": ["n"]}
    config = {"step": 1}

    def logic(self, data, message):
        for _ in data["in"]:
            n = self.add_state("count", self.get_config("step"))
            print(f"[PY] {n}")
            self.emit("counted", n=n)


class Echo(Routine):
    """Emits each item it is given on `out`, unchanged."""

    slots = ["in"]
    events = ["out"]

    def logic(self, data, message):
        for item in data["in"]:
            self.emit("out", item)


class Policy(Routine):
    """Prints the policy's message, then changes its own copy (the next activation must not
    see the change)."""

    slots = ["in"]

    def logic(self, data, message):
        print(f"[PY] {json.dumps(message, sort_keys=True)}")
        message["changed"] = True
