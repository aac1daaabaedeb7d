"""The news fan-out's subscriber in Python, and an echo routine for the benchmarks."""

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


class Echo(Routine):
    """Emits each item it is given on `out`, unchanged."""

    slots = ["in"]
    events = ["out"]

    def logic(self, data, message):
        for item in data["in"]:
            self.emit("out", item)
