"""Chat templates are untrusted code: a render is bounded in memory (operations that grow a value refuse
huge results before making them) and in time (a deadline, also off the main thread), and stays exact."""
from __future__ import annotations

import threading
import time

import pytest

from processing import template_limits
from processing.chat_template import ChatTemplateError, render_chat

MESSAGES = [{"role": "user", "content": "hi"}]
NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x"


@pytest.mark.parametrize("template", [
    "{{ ('a' * 2**33)|length }}",
    "{{ ([0] * 10**9)|length }}",
    "{{ (10**9 * [0])|length }}",
    "{{ (9 ** (9 ** 9)) is number }}",
    "{{ (10 ** 4000 * 10 ** 4000 * 10 ** 4000 * 10 ** 4000 * 10 ** 4000 * 10 ** 4000) is number }}",
    "{% set ns = namespace(s='a') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "{% set ns = namespace(s='a') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% for i in range(100000) %}{{ 'a' * 9999999 }}{% endfor %}",
    "{% set s %}{% for i in range(100000) %}{{ 'a' * 9999999 }}{% endfor %}{% endset %}{{ s|length }}",
    "{% macro m() %}{% for i in range(100000) %}{{ 'a' * 9999999 }}{% endfor %}{% endmacro %}{{ m()|length }}",
    "{{ ('a' * 9999999)|replace('a', 'aaaa')|length }}",
    "{{ ('a' * 9999999).replace('', 'aaaa')|length }}",
    "{{ (['x' * 9999999] * 9)|join(',')|length }}",
    "{{ ','.join(['x' * 9999999] * 9)|length }}",
    "{{ 'a'|center(10**9)|length }}",
    "{{ 'a'.ljust(10**9)|length }}",
    "{{ ('\\t' * 9999999).expandtabs(100)|length }}",
    "{{ ('\\n' * 9999999)|indent(100)|length }}",
    "{{ 'a'|batch(10**9)|list|length }}",
    "{{ ('%*d' % (10**9, 1))|length }}",
    "{{ '%999999999d'|format(1)|length }}",
    "{{ '{:>{}}'.format(1, 10**9)|length }}",
    "{{ '{:>999999999}'.format(1)|length }}",
    "{{ messages|tojson(indent=10**9)|length }}",
    # one C call that no deadline stops: a value weighed whole, not by its outer items
    "{{ (['a' * 9999999] * 20000) == (['a' * 9999999] * 20000) }}",
    "{{ ['a' * 9999999] * 9999999 }}",
    "{% set l = ['a' * 9999999] %}{{ (l + l)|length }}",
    "{% set l = ['a' * 5000000] %}{% set m = [l, l, l] %}{{ m }}",
    "{% set l = ['a' * 5000000] %}{% set m = [l, l, l] %}{{ m|string|length }}",
    "{% set l = ['a' * 5000000] %}{% set m = [l, l, l] %}{{ m|tojson|length }}",
    "{% set l = ['a' * 5000000] %}{% set m = [l, l, l] %}{{ ('' ~ m)|length }}",
    "{{ strftime_now('%c' * 4999999)|length }}",
])
def test_operations_that_would_make_huge_values_are_refused_before_making_them(template):
    started = time.monotonic()
    with pytest.raises(ChatTemplateError, match="chat template: .*(limit is|refused)"):
        render_chat(template, MESSAGES)
    assert time.monotonic() - started < 2


def test_ordinary_growth_and_formatting_still_render():
    template = ("{{ '%d items' % 3 }} {{ '%-5s|'|format('x') }} {{ '{}-{:>4}'.format(1, 22) }} {{ 1700000000|string }} "
                "{{ [1, 2]|join(', ') }} {{ 'ab'|replace('a', 'c') }} {{ 'a' ~ 'b' ~ 3 }} {{ 2**10 }} {{ 'ab' * 2 }} "
                "{{ [1] + [2] }} {{ messages|tojson(indent=1)|length }}"
                "{% macro m(x) %}<{{ x }}>{% endmacro %}{% set s %}{{ m(1) }}{% endset %} {{ s }}")
    assert render_chat(template, MESSAGES) == "3 items x    | 1-  22 1700000000 1, 2 cb ab3 1024 abab [1, 2] 45 <1>"


def _render_in_thread(template: str) -> BaseException | str | None:
    # Ray's CPU-stage actors may render off the main thread: no SIGALRM there.
    outcome: list[BaseException | str] = []

    def render() -> None:
        try:
            outcome.append(render_chat(template, MESSAGES))
        except BaseException as e:     # noqa: B036 (what escapes is the point)
            outcome.append(e)
    thread = threading.Thread(target=render, daemon=True)
    thread.start()
    thread.join(timeout=20)
    return outcome[0] if outcome else None


@pytest.mark.parametrize("in_thread", [False, True])
def test_an_endless_render_stops_at_the_deadline_with_a_chat_template_error(monkeypatch, in_thread):
    monkeypatch.setattr(template_limits, "RENDER_SECONDS", 0.3)
    started = time.monotonic()
    if in_thread:
        error = _render_in_thread(NESTED_LOOPS)
    else:
        with pytest.raises(ChatTemplateError) as caught:
            render_chat(NESTED_LOOPS, MESSAGES)
        error = caught.value
    assert isinstance(error, ChatTemplateError) and "render too slow" in str(error), error
    assert time.monotonic() - started < 5
    assert render_chat("{{ messages[0].content }}", MESSAGES) == "hi"    # the next render is not hit


def seconds_of(fn, *args, **kwargs) -> float:
    started = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - started


def stopped_render(template: str) -> None:
    with pytest.raises(ChatTemplateError):
        render_chat(template, MESSAGES)


def test_renders_ending_right_at_the_deadline_never_leak_the_stop_afterwards(monkeypatch):
    """The watchdog may fire just as a render ends: the stop is raised inside render_chat (a ChatTemplateError)
    or cancelled, never later in the caller's code. Render lengths are spread around the time a stop takes
    here (the deadline plus the watchdog's latency, which a busy process lengthens); each timing is the
    best of three, as a loaded machine can stretch any one of them several times over."""
    template = "{% for i in range(range_) %}{{ i }}{% endfor %}"
    seconds_per_item = min(seconds_of(render_chat, template, MESSAGES, range_=100_000) for _ in range(3)) / 100_000
    monkeypatch.setattr(template_limits, "RENDER_SECONDS", 0.005)
    stop_after = min(seconds_of(stopped_render, NESTED_LOOPS) for _ in range(3))
    outcomes = set()
    for k in range(300):     # from half to twice the time a stop takes
        try:
            render_chat(template, MESSAGES, range_=int(stop_after * (0.5 + k / 200) / seconds_per_item))
            outcomes.add("rendered")
        except ChatTemplateError:
            outcomes.add("stopped")
    until = time.monotonic() + 1.0
    while time.monotonic() < until:     # Python code that a stray stop would hit
        sum(range(100))
    assert outcomes == {"rendered", "stopped"}, (outcomes, stop_after, seconds_per_item)
    assert not template_limits._WATCHDOG._renders


def test_a_stop_raised_as_the_watch_ends_leaves_no_render_watched(monkeypatch):
    """The watchdog fired just as the render ended: its stop is raised on entering unwatch, before the
    lock, and the render stayed watched (every half second a stop in whatever the thread ran next)."""
    unwatch, raised = template_limits._Watchdog.unwatch, []

    def stopped_on_entry(self, render):
        if not raised:
            raised.append(render)
            raise template_limits._RenderTooSlow()
        unwatch(self, render)

    monkeypatch.setattr(template_limits._Watchdog, "unwatch", stopped_on_entry)
    assert render_chat("{{ messages[0].content }}", MESSAGES) == "hi"
    assert raised and not template_limits._WATCHDOG._renders


@pytest.mark.parametrize("template, error", [
    ("{% include 'x.jinja' %}", "TypeError: no loader"),
    ("{% import 'x.jinja' as x %}", "TypeError: no loader"),
    ("{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}", "RecursionError"),
    ("{{ range(10**20)|length }}", "OverflowError"),
    ("{% for k in self %}{% endfor %}", "KeyError"),
])
def test_a_template_failing_in_python_is_a_chat_template_error(template, error):
    """They escaped as the bare TypeError, RecursionError, OverflowError of Jinja or Python."""
    with pytest.raises(ChatTemplateError, match=f"^chat template failed: {error}"):
        render_chat(template, MESSAGES)
