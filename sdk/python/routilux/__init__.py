"""Write routilux routines in Python.

A routine kind is a class. Two styles are accepted, and may be mixed in one plugin.

Declarative: slots, events, default config and default policy as class attributes, and a
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

The reference library's own style: ``__init__`` calls ``super().__init__()`` and declares the
kind with ``add_slot``, ``add_event``, ``set_config``, ``set_logic`` and
``set_activation_policy``; the logic is called as ``fn(slot_data, policy_message,
worker_state)``::

    from routilux import Routine
    from routilux.activation_policies import immediate_policy

    class Shout(Routine):
        def __init__(self):
            super().__init__()
            self.add_slot("input")
            self.add_event("output", ["text"])
            self.set_config(suffix="!")

            def shout(slot_data, policy_message, worker_state):
                for item in slot_data.get("input", []):
                    self.emit("output", text=item["text"].upper() + self.get_config("suffix"))

            self.set_logic(shout)
            self.set_activation_policy(immediate_policy())

Every subclass of ``Routine`` in the plugin's modules is a routine kind of the component; its
name is ``name`` if set, else the class name in snake_case with acronyms kept whole
(``Shout`` -> ``shout``, ``SMSSubscriber`` -> ``sms_subscriber``). The host instantiates each
kind once per instance to learn what it declares, so ``__init__`` must only declare. A policy
a class sets is its kind's default; a flow file's ``policy:`` overrides it. Under the immediate
policy a reference-style logic is called once per item, ``{slot: [item]}``, oldest first, as
the reference delivers them (its examples read ``slot_data[slot][0]``); under the others it
gets the whole batch. ``worker_state`` is this routine's own WorkerState; what a sandbox cannot
reach (other routines' state, the runtime) is refused with a message saying so. Build the plugin
with ``routilux build DIR`` (``componentize-py`` against the routilux WIT); this package is
the only code that touches the generated bindings.

``print`` goes to the job's output. An exception escaping the logic fails the activation
(not retryable; raise ``RoutineError(message, retryable=True)`` when a retry can help) and the
routine's error strategy decides what happens to its items; the traceback goes to stderr.
Instances of a component are pooled and recycled by the host: keep what must last across
activations of a job in worker state (``get_state`` / ``set_state`` / ``add_state``, or the
reference's ``worker_state.get_routine_state(name)`` / ``update_routine_state(name, value)``),
not in attributes.
"""

import copy
import json
import re
import sys
import traceback

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host, types

from .activation_policies import ActivationPolicy


__all__ = ["Routine", "RoutineError", "WorkerState", "kinds"]

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
    # `DataBroadcaster` -> `data_broadcaster`, `SMSSubscriber` -> `sms_subscriber`.
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def _policy_spec(policy, where):
    """The JSON form of a policy: an ``ActivationPolicy`` or the flow file's form itself."""
    if policy is None:
        return None
    if isinstance(policy, ActivationPolicy):
        return policy.spec
    if isinstance(policy, (str, dict)):
        return policy
    if callable(policy):
        raise TypeError(
            f"{where}: a policy function cannot run inside a routilux plugin (the host decides "
            "activations outside the sandbox); use a built-in one from routilux.activation_policies"
        )
    raise TypeError(f"{where}: {policy!r} is not an activation policy")


# The message of the host's immediate policy (what it sends with every activation under it).
_IMMEDIATE = '{"policy":"immediate"}'

class _Declared:
    """What a routine in the reference style declared in its ``__init__``."""

    __slots__ = ("slots", "events", "config", "logic", "policy", "done")

    def __init__(self):
        self.slots = []
        self.events = {}
        self.config = {}
        self.logic = None
        self.policy = None
        self.done = False


def _declared(routine):
    """The declarations of ``routine`` (made if its class's ``__init__`` skipped ours)."""
    declared = routine.__dict__.get("_routilux_")
    if declared is None:
        declared = routine.__dict__["_routilux_"] = _Declared()
    return declared


# Which item a reference-style logic called once per item is at (``None``: not split).
_item_index = [None]

# Whether an activation is running (the host's config and state are reachable only then).
_in_activation = [False]


class WorkerState:
    """What the reference library passes its logic as ``worker_state``: here, this routine's
    own WorkerState in the current job, kept by the host."""

    __slots__ = ()

    def get_routine_state(self, name, default=None):
        """This routine's WorkerState value under ``name`` (``default`` if absent)."""
        text = host.state_get(str(name))
        return default if text is None else json.loads(text)

    def update_routine_state(self, name, value):
        """Sets this routine's WorkerState value under ``name`` (anything JSON can hold)."""
        try:
            host.state_set(str(name), _dumps(value))
        except Err as e:
            raise RoutineError(f"state `{name}`: {e.value}") from None

    def __getattr__(self, attr):
        raise AttributeError(
            f"worker_state.{attr} is not available in a routilux plugin: a sandboxed routine "
            "reaches only its own WorkerState, through get_routine_state(name) and "
            "update_routine_state(name, value); other routines' state and the job's are not "
            "reachable from a sandbox"
        )


_WORKER_STATE = WorkerState()


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
    #: Default activation policy (``routilux.activation_policies``, or the flow file's form:
    #: ``{"batch_size": 10}``); ``None``: immediate. A flow's ``policy:`` overrides it.
    default_policy = None

    def __init__(self):
        # What the reference style declares on the instance (see the module's docs), in one
        # attribute of an unlikely name, so a plugin's own attributes never collide with it.
        self._routilux_ = _Declared()

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

    # -- the reference library's way to declare a kind (in ``__init__``) -------------------

    def _declaring(self, what):
        declared = _declared(self)
        if declared.done:
            raise RoutineError(
                f"{what}: a kind is declared in __init__; its slots, events, config and "
                "policy are fixed once the host has loaded the plugin"
            )
        return declared

    def add_slot(self, name, max_queue_length=None):
        """Declares an input slot (``max_queue_length``: ``None`` for the host's default)."""
        self._declaring(f"add_slot({name!r})").slots.append((str(name), max_queue_length))

    def add_event(self, name, output_params=None):
        """Declares an output event and the field names its items carry."""
        fields = [str(f) for f in (output_params or ())]
        self._declaring(f"add_event({name!r})").events[str(name)] = fields

    def set_config(self, **config):
        """Sets default config values (a flow's config overrides them)."""
        self._declaring("set_config").config.update(config)

    def set_logic(self, fn):
        """Sets the logic: ``fn(slot_data, policy_message, worker_state)``."""
        declared = self._declaring("set_logic")
        if not callable(fn):
            raise TypeError(f"set_logic: {fn!r} is not callable")
        declared.logic = fn

    def set_activation_policy(self, policy):
        """Sets the kind's default activation policy (``routilux.activation_policies``)."""
        declared = self._declaring("set_activation_policy")
        declared.policy = _policy_spec(policy, "set_activation_policy")

    # -- what a routine calls ---------------------------------------------------------------

    def logic(self, data, message):
        """One activation: ``data`` maps each slot to its items (dicts), oldest first;
        ``message`` is the policy's message (or ``None``)."""
        raise NotImplementedError(f"routine kind `{self.name}` has no logic method")

    def emit(self, event, item=None, **fields):
        """Routes an item (a dict, or keyword fields) to every slot connected to ``event``."""
        # The reference's `emit(event, runtime=None, worker_state=None, **kwargs)`: the host
        # routes, so for a routine in its style neither is part of the item.
        if _declared(self).logic is not None:
            if fields.get("runtime", 0) is None:
                del fields["runtime"]
            if isinstance(fields.get("worker_state"), WorkerState):
                del fields["worker_state"]
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
        """The config value under ``key`` (the kind's default with the flow's overrides; in
        ``__init__``, the default)."""
        if not _in_activation[0]:
            declared = {**type(self).config, **_declared(self).config}
            return copy.deepcopy(declared.get(key, default))
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

    @property
    def activation_id(self):
        """This activation's stable id (``JOB/ROUTINE/N``): every retry of it sees the same.
        A reference-style logic called once per item (see the module's docs) sees
        ``JOB/ROUTINE/N#K`` for the K-th item (from 0)."""
        k = _item_index[0]
        return host.activation_id() if k is None else f"{host.activation_id()}#{k}"

    # -- the component's export (called by the host) ----------------------------------------

    def describe(self):
        return [_kind_spec(name, cls) for name, cls in _KINDS.items()]

    def activate(self, kind, batches, message):
        cls = _KINDS.get(kind)
        if cls is None:
            raise Err(types.ActivationError(f"unknown routine kind `{kind}`", False))
        _in_activation[0] = True
        try:
            routine = _instance(cls)
            # Each slot's items come as one JSON array: one parse for the whole batch.
            data = {b.slot: json.loads(b.items) for b in batches}
            logic = _declared(routine).logic
            if logic is None:
                routine.logic(data, _message(message))
            elif message == _IMMEDIATE:
                # The reference delivers each arriving item to an activation of its own, and
                # its logic reads `slot_data[slot][0]`; the host's immediate policy hands over
                # everything queued at once. So a reference-style routine under it is called
                # once per item, oldest first, as the reference would call it.
                k = 0
                for slot, items in data.items():
                    for item in items:
                        _item_index[0] = k
                        logic({slot: [item]}, _message(message), _WORKER_STATE)
                        k += 1
            else:
                logic(data, _message(message), _WORKER_STATE)
        except RoutineError as e:
            raise Err(types.ActivationError(e.message, e.retryable)) from None
        except Exception as e:
            where = _where(e, cls)
            traceback.print_exc(file=sys.stderr)
            raise Err(
                types.ActivationError(f"{type(e).__name__}: {e}{where}", False)
            ) from None
        finally:
            _in_activation[0] = False
            _item_index[0] = None


def _where(e, cls):
    """` (file.py:LINE)`: the innermost frame of the traceback of ``e`` in the plugin's own
    files (the directory of the module defining ``cls``), not one of this SDK or of the
    standard library, which raise on the plugin's behalf."""
    tb = traceback.extract_tb(e.__traceback__)
    if not tb:
        return ""
    module = sys.modules.get(cls.__module__)
    home = getattr(module, "__file__", None)
    home = home.rsplit("/", 1)[0] + "/" if home else None
    frame = next(
        (f for f in reversed(tb) if home and f.filename.startswith(home)), tb[-1]
    )
    return f" ({frame.filename.rsplit('/', 1)[-1]}:{frame.lineno})"


def _instance(cls):
    """The one instance of kind ``cls`` in this component instance, made on first use."""
    routine = _INSTANCES.get(cls)
    if routine is None:
        routine = cls()
        _declared(routine).done = True
        _INSTANCES[cls] = routine
    return routine


def _kind_spec(name, cls):
    """What kind ``cls`` declares (class attributes, then what ``__init__`` added)."""
    try:
        routine = _instance(cls)
    except Exception as e:
        where = _where(e, cls)
        raise RuntimeError(
            f"routine kind `{name}`: {cls.__qualname__}() failed: {type(e).__name__}: {e}{where}"
        ) from None
    slots = cls.slots
    slots = list(slots.items() if isinstance(slots, dict) else ((s, None) for s in slots))
    declared = _declared(routine)
    slots += declared.slots
    events = cls.events
    events = dict(events.items() if isinstance(events, dict) else ((e, ()) for e in events))
    events.update(declared.events)
    config = {**cls.config, **declared.config}
    policy = declared.policy
    if policy is None:
        policy = _policy_spec(cls.default_policy, f"{cls.__qualname__}.default_policy")
    description = cls.description
    if description is None:
        doc = (cls.__doc__ or "").strip()
        description = doc.splitlines()[0] if doc else ""
    return types.RoutineKind(
        name=name,
        description=description,
        slots=[types.SlotSpec(name=s, max_queue_length=n) for s, n in slots],
        events=[types.EventSpec(name=e, fields=list(f)) for e, f in events.items()],
        default_config=_dumps(config),
        default_policy=None if policy is None else _dumps(policy),
    )


# A component has no file system: a module is there at run time only if it was imported when
# the component was built. `routilux build` lists every module the plugin's sources import,
# also inside functions; importing them here puts them in the built component.
try:
    from . import _preload
except Exception:  # built by other means than `routilux build`
    _preload = None
if _preload is not None:
    import importlib

    for _name in _preload.MODULES:
        if _name == "routilux" or _name.startswith("routilux."):
            continue
        try:
            importlib.import_module(_name)
        except Exception:  # not a module (a line that only looked like an import), or broken
            pass
