"""Write routilux routines in Python.

A routine kind is a class: its slots, events and default config as class attributes, and a
``logic`` method that receives every slot's items of one activation (``slot -> list of
dicts``) and the activation policy's message::

    from routilux import Routine

    class Shout(Routine):
        \"\"\"Upper-cases each line it is given.\"\"\"
        slots = ["input"]
        events = {"output": ["text"]}
        config = {"suffix": "!"}

        def logic(self, data, message):
            for item in data["input"]:
                text = item["text"].upper() + self.get_config("suffix")
                print(text)
                self.emit("output", text=text)

Every subclass of ``Routine`` in the plugin's modules is a routine kind of the component; its
name is ``name`` if set, else the class name in snake_case (``Shout`` -> ``shout``). Build the
plugin with ``routilux build DIR`` (``componentize-py`` against the routilux WIT); this module
is the only one that touches the generated bindings.

``print`` goes to the job's output. An exception escaping ``logic`` fails the activation
(not retryable; raise ``RoutineError(message, retryable=True)`` when a retry can help) and the
routine's error strategy decides what happens to its items; the traceback goes to stderr.
Instances of a component are pooled and recycled by the host: keep what must last across
activations of a job in worker state (``get_state`` / ``set_state`` / ``add_state``), not in
attributes.
"""

import json
import re
import sys
import traceback

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host, types

__all__ = ["Routine", "RoutineError", "kinds"]

_KINDS = {}
_INSTANCES = {}
_NOT_SET = object()
_LEVELS = {
    "trace": types.Level.TRACE,
    "debug": types.Level.DEBUG,
    "info": types.Level.INFO,
    "warn": types.Level.WARN,
    "warning": types.Level.WARN,
    "error": types.Level.ERROR,
}


class RoutineError(Exception):
    """Fails the activation with ``message``; ``retryable`` says whether a retry can help."""

    def __init__(self, message, retryable=False):
        super().__init__(message)
        self.message = str(message)
        self.retryable = bool(retryable)


def _snake(name):
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


# One encoder for the module: `json.dumps` with options builds a new encoder on every call.
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


# The last flat policy message (an object of plain values): its text and its value. A
# routine's policy sends the same message with every activation, so a flat one is copied
# rather than parsed again; each activation still gets its own dict. Any other message is
# parsed every time.
_last_message = [None, None]


def _message(text):
    if text is None:
        return None
    last = _last_message
    if text == last[0]:
        return dict(last[1])
    value = json.loads(text)
    if isinstance(value, dict) and not any(isinstance(v, (dict, list)) for v in value.values()):
        last[:] = [text, value]
        return dict(value)
    return value


def kinds():
    """The routine kinds defined so far, by name."""
    return dict(_KINDS)


class Routine(exports.Routine):
    """Base class of a routine kind (and the component's ``routine`` export)."""

    #: Kind name; ``None``: the class name in snake_case.
    name = None
    #: One line saying what the kind does; ``None``: the docstring's first line.
    description = None
    #: Input slots: names, or a dict ``name -> max queue length`` (``None``: host default).
    slots = ()
    #: Output events: names, or a dict ``name -> [field names]``.
    events = ()
    #: Default config (a flow's config overrides its keys).
    config = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("abstract", False):
            return
        name = cls.__dict__.get("name") or _snake(cls.__name__)
        cls.name = name
        if name in _KINDS and _KINDS[name] is not cls:
            raise TypeError(
                f"routine kind `{name}` is defined twice "
                f"({_KINDS[name].__qualname__} and {cls.__qualname__})"
            )
        _KINDS[name] = cls

    # -- what a routine calls ---------------------------------------------------------------

    def logic(self, data, message):
        """One activation: ``data`` maps each slot to its items (dicts), oldest first;
        ``message`` is the policy's message (or ``None``)."""
        raise NotImplementedError(f"routine kind `{self.name}` has no logic method")

    def emit(self, event, item=None, **fields):
        """Routes an item (a dict, or keyword fields) to every slot connected to ``event``."""
        if item is None:
            item = fields
        elif fields:
            item = {**item, **fields}
        if not isinstance(item, dict):
            raise TypeError(f"emit `{event}`: an item is a dict, not {type(item).__name__}")
        try:
            host.emit(event, _dumps(item))
        except Err as e:
            raise RoutineError(f"emit `{event}`: {e.value}") from None

    def get_config(self, key, default=None):
        """The config value under ``key`` (the kind's default with the flow's overrides)."""
        text = host.config(key)
        return default if text is None else json.loads(text)

    def get_state(self, key, default=None):
        """This routine's worker state under ``key`` in the current job."""
        text = host.state_get(key)
        return default if text is None else json.loads(text)

    def set_state(self, key, value):
        """Sets worker state ``key`` to ``value`` (anything JSON can hold)."""
        try:
            host.state_set(key, _dumps(value))
        except Err as e:
            raise RoutineError(f"state `{key}`: {e.value}") from None

    def add_state(self, key, delta=1):
        """Atomically adds ``delta`` to the integer under ``key``; returns the new value."""
        try:
            return host.state_add(key, int(delta))
        except Err as e:
            raise RoutineError(f"state `{key}`: {e.value}") from None

    def compare_and_swap_state(self, key, expected, value):
        """Atomically sets ``key`` to ``value`` if it holds ``expected`` (``None``: absent)."""
        expected = None if expected is None else _dumps(expected)
        try:
            return host.state_compare_and_swap(key, expected, _dumps(value))
        except Err as e:
            raise RoutineError(f"state `{key}`: {e.value}") from None

    def log(self, level, message):
        """A structured log line (level: trace, debug, info, warn or error)."""
        lvl = _LEVELS.get(str(level).lower())
        if lvl is None:
            raise ValueError(f"unknown log level `{level}`")
        host.log(lvl, str(message))

    @property
    def job_id(self):
        """The id of the job this activation belongs to."""
        return host.job_id()

    # -- the component's export (called by the host) ----------------------------------------

    def describe(self):
        out = []
        for name, cls in _KINDS.items():
            slots = cls.slots
            slots = slots.items() if isinstance(slots, dict) else ((s, None) for s in slots)
            events = cls.events
            events = events.items() if isinstance(events, dict) else ((e, ()) for e in events)
            description = cls.description
            if description is None:
                doc = (cls.__doc__ or "").strip()
                description = doc.splitlines()[0] if doc else ""
            out.append(
                types.RoutineKind(
                    name=name,
                    description=description,
                    slots=[types.SlotSpec(name=s, max_queue_length=n) for s, n in slots],
                    events=[types.EventSpec(name=e, fields=list(f)) for e, f in events],
                    default_config=_dumps(dict(cls.config)),
                )
            )
        return out

    def activate(self, kind, batches, message):
        routine = _INSTANCES.get(kind)
        if routine is None:
            cls = _KINDS.get(kind)
            if cls is None:
                raise Err(types.ActivationError(f"unknown routine kind `{kind}`", False))
            routine = _INSTANCES[kind] = cls()
        try:
            # Each slot's items come as one JSON array: one parse for the whole batch.
            data = {b.slot: json.loads(b.items) for b in batches}
            routine.logic(data, _message(message))
        except RoutineError as e:
            raise Err(types.ActivationError(e.message, e.retryable)) from None
        except Exception as e:
            tb = traceback.extract_tb(e.__traceback__)
            where = f" ({tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno})" if tb else ""
            traceback.print_exc(file=sys.stderr)
            raise Err(
                types.ActivationError(f"{type(e).__name__}: {e}{where}", False)
            ) from None
