"""Activation policies, named as the Python reference library names them.

A policy decides when a routine runs and which of its queued items an activation gets. In
routilux the host runs the policy (under the routine's queue lock, outside any sandbox), so a
plugin picks one of the host's built-in policies; each helper here returns one, and
``Routine.set_activation_policy(policy)`` (or a declarative class's ``default_policy = ...``) makes it
the kind's default. A flow file's ``policy:`` still overrides it per routine::

    from routilux.activation_policies import batch_size_policy
    self.set_activation_policy(batch_size_policy(10))
"""

__all__ = [
    "ActivationPolicy",
    "immediate_policy",
    "batch_size_policy",
    "all_slots_ready_policy",
    "time_interval_policy",
    "custom_policy",
]


class ActivationPolicy:
    """A built-in policy, as the flow file writes it (``spec`` is its JSON form)."""

    __slots__ = ("spec",)

    def __init__(self, spec):
        self.spec = spec

    def __repr__(self):
        return f"ActivationPolicy({self.spec!r})"

    def __eq__(self, other):
        return isinstance(other, ActivationPolicy) and other.spec == self.spec

    def __hash__(self):
        return hash(repr(self.spec))


def immediate_policy():
    """Run as soon as anything arrives; take everything queued (the default)."""
    return ActivationPolicy("immediate")


def batch_size_policy(min_batch_size):
    """Run when every slot holds at least ``min_batch_size`` items; take that many from each."""
    if isinstance(min_batch_size, bool) or not isinstance(min_batch_size, int):
        raise TypeError(f"batch_size_policy: the batch size is an int, not {min_batch_size!r}")
    if min_batch_size < 1:
        raise ValueError(f"batch_size_policy: the batch size must be at least 1, not {min_batch_size}")
    return ActivationPolicy({"batch_size": min_batch_size})


def all_slots_ready_policy():
    """Run when every slot holds at least one item; take one from each."""
    return ActivationPolicy("all_slots_ready")


def time_interval_policy(min_interval_seconds):
    """Run at most once per ``min_interval_seconds``; trailing items are released when the
    interval ends."""
    if isinstance(min_interval_seconds, bool) or not isinstance(min_interval_seconds, (int, float)):
        raise TypeError(
            f"time_interval_policy: the interval is a number of seconds, not {min_interval_seconds!r}"
        )
    ms = round(min_interval_seconds * 1000)
    if ms < 1:
        raise ValueError(
            f"time_interval_policy: the interval must be at least 1 ms, not {min_interval_seconds} s"
        )
    if ms > 86_400_000:
        raise ValueError(
            f"time_interval_policy: the interval must be at most a day, not {min_interval_seconds} s"
        )
    return ActivationPolicy({"time_interval": f"{ms}ms"})


def custom_policy(*args, **kwargs):
    """Not available in a plugin: refused with the reason."""
    raise NotImplementedError(
        "custom_policy: a custom activation policy cannot run inside a routilux plugin: the host "
        "decides activations under the routine's queue lock, outside the sandbox, so a plugin "
        "picks a built-in policy (immediate_policy, batch_size_policy, all_slots_ready_policy, "
        "time_interval_policy); a Rust program embedding routilux can write a custom one"
    )
