"""The news fan-out's subscriber in Python, and an echo routine for the benchmarks."""

import json
import os

from routilux import Routine
from routilux.activation_policies import batch_size_policy


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


class RefCounter(Routine):
    """The reference library's style: counts items in WorkerState, two at a time (the policy
    its class sets); a `probe` item tries what a sandbox refuses."""

    def __init__(self):
        super().__init__()
        self.add_slot("in")
        self.add_event("counted", ["count"])

        def count(slot_data, policy_message, worker_state):
            items = slot_data.get("in", [])
            for item in items:
                if item.get("probe") == "state":
                    worker_state.get_flow_state("other")
                if item.get("probe") == "declare":
                    self.add_slot("late")
            state = worker_state.get_routine_state("counter") or {}
            n = state.get("count", 0) + len(items)
            worker_state.update_routine_state("counter", {"count": n})
            seq = self.activation_id.rsplit("/", 1)[1]
            print(f"[PY] {len(items)} items, count {n}, {policy_message['policy']}, {seq}")
            self.emit("counted", count=n)

        self.set_logic(count)
        self.set_activation_policy(batch_size_policy(2))
