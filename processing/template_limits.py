"""Bounds on what a chat template may cost: Jinja2's sandbox bounds neither time nor memory, and
templates ship with checkpoints (untrusted code). Operations that grow a value (`*`, `**`, `+`, `%`,
`~`, padding / replace / join, the output itself) refuse results over MAX_ITEMS characters or items
(or MAX_INT_BITS bits), and a render that runs past RENDER_SECONDS is stopped. A value is weighed
whole (every level's items and characters) where one C call would print or repeat it: no deadline
stops a call in C. Left: comparing two heavy values (`==` of nested literals of a shared large list).
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import jinja2
from jinja2.compiler import CodeGenerator, optimizeconst
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import ChatTemplateError

# A real chat template renders in well under a millisecond and makes a prompt of a few thousand
# characters; these bounds are orders of magnitude above that and far below what hurts a worker.
RENDER_SECONDS = 3.0
MAX_ITEMS = 10_000_000
MAX_INT_BITS = 1 << 16
MAX_JSON_INDENT = 64
MAX_DATE_FORMAT = 1000
_SEQUENCES = (str, list, tuple)
# printf widths / precisions from the arguments (`*`) or with 8+ digits; str.format specs with 8+ digit
# numbers or nested replacement fields: all could ask for gigabytes of padding in one C call.
_HUGE_PRINTF = re.compile(r"%(\([^)]*\))?[-#0 +]*(\*|\d{8,}|\d*\.(\*|\d{8,}))")
_HUGE_FORMAT = re.compile(r"\{[^{}]*:[^{}]*(\{|\d{8,})")


def check_size(size: int, what: str, limit: int = MAX_ITEMS, unit: str = "items") -> None:
    if size > limit:
        raise ChatTemplateError(f"chat template: {what} would make {size} {unit}; the limit is {limit}")


def weight(value: Any, budget: int = MAX_ITEMS) -> int:
    """Items and characters of a value, all its levels counted (a list of one 10 M-character string
    repeated 10 M times is 10^14, not 10 M items): what printing or comparing it costs in one C call,
    which no deadline can stop. Counted only until past `budget`."""
    if isinstance(value, str):
        return len(value)
    if not isinstance(value, (list, tuple, dict)):
        return 1
    total = len(value)
    for item in (value if not isinstance(value, dict) else (*value, *value.values())):
        total += weight(item, budget - total)
        if total > budget:
            break
    return total


def _check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse, before computing it, an operation whose result would be huge."""
    if operator == "+" and isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES):
        check_size(weight(left) + weight(right), "'+'")
    elif operator == "*" and isinstance(left, int) and isinstance(right, int):
        check_size(left.bit_length() + right.bit_length(), "'*'", MAX_INT_BITS, "bits")
    elif operator == "*" and isinstance(left, int) != isinstance(right, int):
        sequence, count = (right, left) if isinstance(left, int) else (left, right)
        if isinstance(sequence, _SEQUENCES):
            check_size(weight(sequence, MAX_ITEMS // max(count, 1)) * count, "'*'")
    elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
        check_size(left.bit_length() * right, "'**'", MAX_INT_BITS, "bits")
    elif operator == "%" and isinstance(left, str) and _HUGE_PRINTF.search(left):
        raise ChatTemplateError("chat template: refused a '%' width or precision from the arguments or of 8+ digits")


def check_printable(value: Any) -> Any:
    """A container about to be printed whole (output, `~`, string / tojson / pprint) within MAX_ITEMS."""
    if isinstance(value, (list, tuple, dict)):
        check_size(weight(value), "printing a value", unit="characters and items")
    return value


def _printed(value: Any) -> str:
    return str(check_printable(value))


def _check_call(text: str, name: str, args: tuple, kwargs: dict) -> None:
    """Refuse a str method's or a filter's call whose result would be huge: widths, counts, sizes."""
    check_size(max((v for v in (*args, *kwargs.values()) if isinstance(v, int)), default=0), f"{name}'s argument")
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        found = text.count(args[0]) if args[0] else len(text) + 1
        count = found if len(args) < 3 or args[2] is None or args[2] < 0 else min(found, args[2])
        check_size(len(text) + count * (len(args[1]) - len(args[0])), "replace")
    elif name in ("expandtabs", "indent"):     # the tab size / indent is repeated at every tab / line
        width = kwargs.get("width", kwargs.get("tabsize", args[0] if args else 8))
        width = len(width) if isinstance(width, str) else width
        check_size(len(text) + text.count("\t" if name == "expandtabs" else "\n") * width, name)


def _joinable(separator: str, items: Iterable[Any], stringify: bool) -> list[Any]:
    # str.join would first turn every item into a string, with no way to stop it: we do it, counting.
    joined, total = [], 0
    for item in items:
        item = str(item) if stringify else item
        total += len(separator) + (len(item) if isinstance(item, str) else 0)
        check_size(total, "join", unit="characters")
        joined.append(item)
    return joined


def _bounded_filter(name: str, filter_: Callable) -> Callable:
    """Jinja's filter, after the checks of _check_call (format: of '%'); join's items are counted as joined."""
    value_at = 1 if getattr(filter_, "jinja_pass_arg", None) else 0   # after the context / eval context

    @functools.wraps(filter_)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        value, rest = args[value_at], args[value_at + 1:]
        if name in ("string", "pprint", "tojson"):
            check_printable(value)
        if name == "format":
            _check_binop("%", str(value), rest)   # its arguments are values to print, not sizes
        elif name == "join":
            plain = len(rest) < 2 and "attribute" not in kwargs
            items = _joinable(str(kwargs.get("d", rest[0] if rest else "")), value, stringify=plain)
            args = (*args[:value_at], items, *rest)
        else:
            _check_call(str(value) if name in ("replace", "indent") else "", name, rest, kwargs)
        return filter_(*args, **kwargs)
    return bounded


class _BoundedBuffer(list):
    """What a {% set %} block, a macro or a call block writes: bounded as it fills, not once joined."""
    size = 0

    def append(self, part: Any) -> None:
        self.size += len(part) if isinstance(part, str) else 0
        if self.size > MAX_ITEMS:
            check_size(self.size, "a block of the render", unit="characters")
        super().append(part)

    def extend(self, parts: Iterable[Any]) -> None:
        for part in parts:
            self.append(part)


def _bounded_concat(parts: Iterable[str]) -> str:
    # The output, blocks, macros and `~` all join here: bounds what repetition builds (a loop, not a
    # _BoundedBuffer: this runs for every render and a method call per part would double its cost).
    kept, total = [], 0
    for part in parts:
        total += len(part)
        if total > MAX_ITEMS:
            check_size(total, "the render (or a block of it)", unit="characters")
        kept.append(part)
    return "".join(kept)


class _BoundedCodeGenerator(CodeGenerator):
    def buffer(self, frame: Any) -> None:
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.buffer_class()")

    @optimizeconst
    def visit_Concat(self, node: jinja2.nodes.Concat, frame: Any) -> None:
        # Jinja joins `a ~ b` with its own str_join; ours goes through the bounded concat.
        self.write("environment.concat(map(environment.printed, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write(")))")


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja2's immutable sandbox with the operations that grow a value bounded (the module's docstring)."""
    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _BoundedCodeGenerator
    buffer_class = _BoundedBuffer
    concat = staticmethod(_bounded_concat)
    printed = staticmethod(_printed)

    def __init__(self, **options: Any) -> None:
        super().__init__(finalize=check_printable, **options)
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_binop(operator, left, right)
        return self.binop_table[operator](left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (as Jinja's)
        owner, name = getattr(__obj, "__self__", None), getattr(__obj, "__name__", "")
        if isinstance(owner, str) and name == "join" and args:
            args = (_joinable(owner, args[0], stringify=False), *args[1:])
        elif isinstance(owner, str):
            _check_call(owner, name, args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is not None and _HUGE_FORMAT.search(value.__self__):
            raise ChatTemplateError("chat template: a str.format spec with 8+ digits or a nested field is refused")
        return wrapped


class _RenderTooSlow(BaseException):
    """Raised in a render past its deadline; not an Exception, which Jinja or a filter might swallow."""


@dataclass(eq=False, slots=True)
class _Render:
    thread_id: int
    deadline: float
    fired: bool = False


_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
_set_async_exc.argtypes = (ctypes.c_ulong, ctypes.py_object)


class _Watchdog:
    """One daemon thread raises _RenderTooSlow in the thread of a render past its deadline (renders may run
    off the main thread, in Ray actors: no SIGALRM). It wakes about once per deadline while renders go on."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._renders: set[_Render] = set()
        self._wake_at = math.inf
        self._thread: threading.Thread | None = None

    def watch(self, render: _Render) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="chat-template-watchdog", daemon=True)
                self._thread.start()
            self._renders.add(render)
            if render.deadline < self._wake_at:
                self._wakeup.notify()

    def unwatch(self, render: _Render) -> None:
        # Only `with` on a bare Lock here: an exception raised in this thread can then never leave it held.
        # Under the lock the watchdog cannot fire; one it fired but that was not raised yet is cancelled.
        with self._lock:
            self._renders.discard(render)
            if render.fired:
                _set_async_exc(render.thread_id, ctypes.py_object())

    def _run(self) -> None:
        with self._lock:
            while True:
                now = time.monotonic()
                for render in [r for r in self._renders if r.deadline <= now]:
                    render.fired = True
                    render.deadline = now + 0.5     # again, should something swallow it
                    _set_async_exc(render.thread_id, ctypes.py_object(_RenderTooSlow))
                self._wake_at = min((r.deadline for r in self._renders), default=math.inf)
                self._wakeup.wait(None if self._wake_at == math.inf else self._wake_at - now)


_WATCHDOG = _Watchdog()
os.register_at_fork(after_in_child=_WATCHDOG.__init__)   # the thread does not survive a fork; its lock might be held


def _unwatch(render: _Render) -> None:
    """A stop fired as the render ended can be raised as unwatch is entered, before it takes the lock:
    the render would stay watched, and the watchdog would stop whatever this thread ran next."""
    while True:
        try:
            _WATCHDOG.unwatch(render)
            return
        except _RenderTooSlow:
            continue


def render_within_deadline(template: jinja2.Template, variables: dict[str, Any]) -> str:
    render = _Render(threading.get_ident(), time.monotonic() + RENDER_SECONDS)
    try:
        try:
            _WATCHDOG.watch(render)
            return template.render(**variables)
        finally:
            _unwatch(render)
    except _RenderTooSlow:
        raise ChatTemplateError(f"chat template render too slow: stopped after {RENDER_SECONDS:g} s (the template "
                                "loops too much)") from None
