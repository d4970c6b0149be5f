"""The chat template's renderer, fast: the template compiled in apply_chat_template's own Jinja environment, then
again in an overlay of it that renders the same text in less time (:func:`fast_renderer`). Speed only: what the text
is, and what is trained, is sftdist.data.template's to say; a test checks this renders what apply_chat_template does.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from sftdist.errors import ConfigError


def compile_template(template: str, where: str) -> Any:
    """The template compiled in apply_chat_template's Jinja environment; a syntax error names ``where``."""
    import jinja2
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        return _compile_jinja_template(template)
    except jinja2.TemplateSyntaxError as err:
        raise ConfigError(f"{where}: the chat template does not parse: {err.message} (line {err.lineno})") from err


_DICT_ATTRIBUTES = frozenset(dir(dict))
_LOOP_COUNTERS = frozenset(("index", "index0", "revindex", "revindex0", "first", "last", "length", "depth", "depth0"))


class JsonMemo:
    """The ``tojson`` filter, serialising each value once for all the renders of one conversation (inside
    ``scope()``, in this thread; elsewhere it just calls ``tojson``). Exact: a template cannot change a value (the
    sandbox is immutable), so the same object gives the same JSON; the memo holds every object it saw, so no id is
    reused by another object while it lives; and only calls whose options are plain constants (None, truths,
    numbers, strings, lists of strings) are remembered: a lazy option (a ``map`` generator) goes to ``tojson``."""

    def __init__(self, tojson: Any):
        self.tojson = tojson
        self._local = threading.local()

    def __call__(self, value: Any, *args: Any, **kwargs: Any) -> str:
        memo = getattr(self._local, "memo", None)
        options = (*args, *sorted(kwargs.items()))
        if memo is None or not all(_constant(o) for o in options):
            return self.tojson(value, *args, **kwargs)
        key = (id(value), repr(options))
        seen = memo.get(key)
        if seen is None:
            seen = memo[key] = (value, self.tojson(value, *args, **kwargs))
        return seen[1]

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        outer = getattr(self._local, "memo", None)
        self._local.memo = {} if outer is None else outer
        try:
            yield
        finally:
            self._local.memo = outer


def _constant(option: Any) -> bool:
    """A tojson option whose repr says all it is: None, a truth, a number, a string, a list or pair of these."""
    if type(option) in (list, tuple):
        return all(_constant(o) for o in option)
    return option is None or type(option) in (bool, int, float, str)


def fast_renderer(compiled: Any, template: str) -> tuple[Any, JsonMemo]:
    """``template`` compiled again in an overlay of apply_chat_template's environment (same class, settings,
    filters, tests, globals and extensions), rendering the same text faster:

    - its ``getattr`` answers ``message.role`` on a plain dict from the dict at once. The sandbox would first try
      the dict's attributes and fail, then read the item; for a plain dict and a name that is not an attribute of
      dict that failure is certain, so the answer is the same (the item, or the same Undefined) without the
      exception. ``loop.last`` and the loop's other counters, which the sandbox checks and allows (numbers and
      truths of a LoopContext), are read at once too. Anything else goes to the sandbox's own ``getattr``;
    - its globals are a plain dict (a copy of the chain of template and environment globals, which are set once
      when the template is compiled), so each render's context is a dict copy, not a walk of the chain;
    - its ``tojson`` can serialise a value once for all the renders of a conversation (``JsonMemo``)."""
    from jinja2.runtime import LoopContext

    env = compiled.environment.overlay()
    env.filters = dict(env.filters)  # (the overlay's own: the environment's stay as they are)
    memo = env.filters["tojson"] = JsonMemo(env.filters["tojson"])
    sandbox_getattr, undefined = env.getattr, env.undefined

    def getattr_(obj: Any, attribute: Any) -> Any:
        if type(obj) is dict and type(attribute) is str and attribute not in _DICT_ATTRIBUTES:
            try:
                return obj[attribute]
            except (TypeError, LookupError):
                return undefined(obj=obj, name=attribute)
        if type(obj) is LoopContext and attribute in _LOOP_COUNTERS:
            try:
                return getattr(obj, attribute)
            except AttributeError:  # (raised by the loop's items while reading ahead: the sandbox then tries
                return undefined(obj=obj, name=attribute)  # loop[attribute], which a LoopContext refuses)
        return sandbox_getattr(obj, attribute)

    env.getattr = getattr_
    renderer = env.from_string(template)
    renderer.globals = dict(renderer.globals)
    return renderer, memo
