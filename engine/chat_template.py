"""Chat templates: the model file's Jinja template, rendered in a bounded sandbox.

A GGUF carries the model's chat template (`tokenizer.chat_template`), written for HF transformers'
`apply_chat_template`. We render it the same way (so prompts match token for token):

    ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True) + loop controls
    filters: tojson (ensure_ascii=False, indent, separators, sort_keys)
    globals: raise_exception(msg), strftime_now(fmt), dict(...), namespace(...) (no "_" names)
    variables: messages, tools, documents, add_generation_prompt, bos_token, eos_token, enable_thinking, **extra

A template is code from a file, so rendering is bounded (../shared/docs/security.md): every `for`
iteration, call, filter and binary operation is counted and timed (a recursive macro has no loop to
count), output and every intermediate string are capped, and what would allocate past the cap is refused
before it runs (`%` and `format` widths, `indent`, `join`); any error -- including the template's own
`raise_exception` -- becomes one KawaiError. Templates are never taken from requests.
"""

from __future__ import annotations

import contextvars
import functools
import json
import math
import re
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from kawai.engine.errors import KawaiError

MAX_OUTPUT_CHARS = 4 * 1024 * 1024  # a rendered prompt (and any string built on the way) stays below this
MAX_LOOP_ITERATIONS = 1_000_000  # all `for` iterations of one render together
MAX_RENDER_SECONDS = 2.0
MAX_ARGUMENT_INT = 100_000  # the largest integer passed to a filter or a call (widths, counts, repeats)

# Used when the file has no template: ChatML, which both of our catalog families speak.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_LOOP_GUARD = "kawai.loop_guard"  # internal filters the parser wraps around loops and `~` joins
_SIZE_GUARD = "kawai.size_guard"
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # HF's aliases, first one standard
_MAX_DATA_DEPTH = 64


class TemplateLimitError(KawaiError):
    """A render ran past its iteration, time or size bound."""


class TemplateFailedError(KawaiError):
    """The template's code raised a Python error (TypeError, ...): its text is for the log, not a client."""


class _RenderBudget:
    """Per-render counters, in a context variable the template cannot name: ticked by every loop
    iteration, call, filter, binary operation and output chunk."""

    def __init__(self, max_iterations: int, seconds: float):
        self._left = max_iterations
        self._deadline = time.monotonic() + seconds

    def _tick(self) -> None:
        self._left -= 1
        if self._left < 0:
            raise TemplateLimitError("chat template ran too many loop iterations")
        if time.monotonic() > self._deadline:
            raise TemplateLimitError("chat template took too long to render")


_BUDGET: contextvars.ContextVar[_RenderBudget] = contextvars.ContextVar("kawai_render_budget")


def _tick() -> None:
    budget = _BUDGET.get(None)
    if budget is not None:  # None: a filter used outside render (tests)
        budget._tick()


# A width or precision in a printf-style or str.format spec (`%400000000s`, `{:>400000000}`).
_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\d+|\*)?(?:\.(\d+|\*))?")
_FORMAT_SPEC = re.compile(r"\{[^{}]*:[^{}0-9]*(\d+)?(?:[,_])?(?:\.(\d+))?[^{}]*\}")


def _check_format(fmt: Any, args: Any, max_chars: int) -> None:
    """Refuse a format whose widths (or `*` arguments) would build a string past the cap."""
    if not isinstance(fmt, str):
        return
    widths = [w for m in _PRINTF_SPEC.finditer(fmt) for w in m.groups()[-2:] if w and w != "*"]
    widths += [w for m in _FORMAT_SPEC.finditer(fmt) for w in m.groups() if w]
    numbers = [int(w) for w in widths]
    if "*" in fmt:
        items = args if isinstance(args, (tuple, list)) else (args,)
        numbers += [a for a in items if isinstance(a, int) and not isinstance(a, bool)]
    if any(n > max_chars for n in numbers):
        raise TemplateLimitError(f"chat template formats a value wider than {max_chars} characters")


def _check_filter_input(name: str, args: tuple, kwargs: dict, max_chars: int) -> None:
    """Estimate what `indent`, `join` and `format` build, before they build it."""
    if not args:
        return
    value, rest = args[0], args[1:]
    if name == "format":
        _check_format(value, rest or tuple(kwargs.values()), max_chars)
    elif name == "indent" and isinstance(value, str):
        width = rest[0] if rest else kwargs.get("width", 4)
        width = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        if len(value) + abs(width) * (value.count("\n") + 1) > max_chars:
            raise TemplateLimitError(f"chat template built a value longer than {max_chars} items")
    elif name == "join" and isinstance(value, (list, tuple)):
        sep = rest[0] if rest else kwargs.get("d", "")
        total = sum(len(v) if isinstance(v, str) else 16 for v in value)
        total += len(sep) * max(0, len(value) - 1) if isinstance(sep, str) else 0
        if total > max_chars:
            raise TemplateLimitError(f"chat template built a value longer than {max_chars} items")


def _check_size(value: Any, max_chars: int) -> Any:
    if isinstance(value, (str, list, tuple, dict)) and len(value) > max_chars:
        raise TemplateLimitError(f"chat template built a value longer than {max_chars} items")
    return value


def _check_args(args: tuple, kwargs: dict) -> None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_ARGUMENT_INT:
            raise TemplateLimitError(f"chat template passed {a} to a function (limit {MAX_ARGUMENT_INT})")


# ---- HF-compatible helpers ----


def _raise_exception(message: Any) -> None:
    raise jinja2.TemplateError(str(message))


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys=False):
    """transformers' tojson: no HTML escaping, non-ASCII kept, indent/separators as json.dumps."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` for templates without exposing the dict type itself (as transformers)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(Namespace):
    """`namespace(...)` that refuses underscore names, so no dunder can be stored or reached."""

    def __init__(*args: Any, **kwargs: Any):  # noqa: N805 -- Jinja's signature trick: `self` may be a kwarg
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


# ---- the bounded sandbox ----


def _loop_guard(iterable: Any) -> Any:
    for item in iterable:
        _tick()
        yield item


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, plus: every `for` iteration, call, filter and `*`/`**`/`+`/`%` counted and timed; their
    results and `~` size-checked; call/filter integer arguments capped; widths checked before formatting."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, max_chars: int):
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag])
        self.max_chars = max_chars
        for name, f in list(self.filters.items()):
            self.filters[name] = self._bounded_filter(name, f)
        self.filters["tojson"] = self._bounded_filter("tojson", _tojson)
        self.filters[_LOOP_GUARD] = _loop_guard
        self.filters[_SIZE_GUARD] = functools.partial(_check_size, max_chars=max_chars)
        self.globals.pop("lipsum", None)  # lorem ipsum of any length: no template needs it
        self.globals.update(
            raise_exception=_raise_exception,
            strftime_now=_strftime_now,
            dict=_TemplateDict(),
            namespace=_TemplateNamespace,
        )

    def _bounded_filter(self, name: str, f: Any) -> Any:
        skip = 1 if hasattr(f, "jinja_pass_arg") else 0  # (context,) value, then the filter's arguments

        @functools.wraps(f)
        def bounded(*args: Any, **kwargs: Any) -> Any:
            _tick()
            _check_args(args[skip + 1 :], kwargs)
            _check_filter_input(name, args[skip:], kwargs, self.max_chars)
            return _check_size(f(*args, **kwargs), self.max_chars)

        return bounded

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Filter(loop.iter, _LOOP_GUARD, [], [], None, None, lineno=loop.lineno)
        for concat in list(tree.find_all(nodes.Concat)):
            _replace_node(tree, concat, nodes.Filter(concat, _SIZE_GUARD, [], [], None, None, lineno=concat.lineno))
        return tree

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _tick()
        if operator == "%":
            _check_format(left, right, self.max_chars)
        elif operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > self.max_chars:
                    raise TemplateLimitError(f"chat template built a value longer than {self.max_chars} items")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            if abs(left) > 1 and right * math.log2(abs(left)) > 4096:
                raise TemplateLimitError("chat template computed a number larger than 2**4096")
        return _check_size(super().call_binop(context, operator, left, right), self.max_chars)

    def wrap_str_format(self, value: Any) -> Any:
        """`'...'.format` / `format_map` as Jinja's sandbox wraps them, widths checked first."""
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None

        @functools.wraps(wrapped)
        def bounded(*args: Any, **kwargs: Any) -> str:
            _check_format(value.__self__, args, self.max_chars)
            return wrapped(*args, **kwargs)

        return bounded

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (Jinja's)
        _tick()
        _check_args(args, kwargs)
        return _check_size(super().call(__context, __obj, *args, **kwargs), __self.max_chars)


def _replace_node(tree: nodes.Node, old: nodes.Node, new: nodes.Node) -> None:
    """Put `new` where `old` sits in its parent's fields (Jinja nodes have no parent links)."""
    for parent in tree.find_all(nodes.Node):
        for field in parent.fields:
            value = getattr(parent, field, None)
            if value is old:
                setattr(parent, field, new)
                return
            if isinstance(value, list):
                for i, item in enumerate(value):
                    if item is old:
                        value[i] = new
                        return


# ---- template data ----


def _plain(value: Any, depth: int = 0) -> Any:
    """A fresh copy in plain JSON types (what a template may see); other objects become "<TypeName>"."""
    if depth > _MAX_DATA_DEPTH:
        raise KawaiError(f"chat messages are nested deeper than {_MAX_DATA_DEPTH} levels")
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k, depth + 1): _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, depth + 1) for v in value]
    return f"<{type(value).__name__}>"


def _prepare_messages(messages: Any) -> list[dict]:
    """HF's normalisation: keys set to None dropped; reasoning copied to `reasoning_content` and `thinking`."""
    if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
        raise KawaiError("chat messages must be a list of objects")
    prepared = []
    for message in _plain(messages):
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        prepared.append(message)
    return prepared


class ChatTemplate:
    """A compiled chat template. Thread-safe: rendering keeps all state in the call."""

    def __init__(
        self,
        source: str | None,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        max_output_chars: int = MAX_OUTPUT_CHARS,
        max_loop_iterations: int = MAX_LOOP_ITERATIONS,
        max_render_seconds: float = MAX_RENDER_SECONDS,
    ):
        self.is_fallback = source is None
        self.source = CHATML_TEMPLATE if source is None else source
        if not isinstance(self.source, str):
            raise KawaiError("chat template must be a string")
        self._special = {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v is not None}
        self._max_chars = max_output_chars
        self._max_iterations = max_loop_iterations
        self._max_seconds = max_render_seconds
        env = _BoundedEnvironment(max_output_chars)
        try:
            tree = env.parse(self.source)
            self._template = env.from_string(tree)
        except jinja2.TemplateSyntaxError as e:
            raise KawaiError(f"chat template: syntax error on line {e.lineno}: {e.message}") from None
        except jinja2.TemplateError as e:
            raise KawaiError(f"chat template cannot be compiled: {e.message}") from None
        except RecursionError:
            raise KawaiError("chat template is nested too deeply to compile") from None
        variables = jinja2.meta.find_undeclared_variables(tree)
        self.supports_thinking: bool = "enable_thinking" in variables
        self.supports_tools: bool = "tools" in variables

    @classmethod
    def from_gguf(cls, metadata: Mapping[str, Any], tokenizer: Any) -> ChatTemplate:
        """The file's `tokenizer.chat_template` (ChatML when it has none), with its BOS/EOS token text."""
        source = metadata.get("tokenizer.chat_template")
        if source is not None and not isinstance(source, str):
            raise KawaiError("tokenizer.chat_template must be a string")
        bos, eos = tokenizer.bos_id, tokenizer.eos_id
        return cls(
            source,
            bos_token=None if bos is None else tokenizer.id_to_piece(bos),
            eos_token=None if eos is None else tokenizer.id_to_piece(eos),
        )

    def render(
        self,
        messages: list[dict],
        *,
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        **extra: Any,
    ) -> str:
        """The prompt text for messages (HF format). enable_thinking=None leaves the template's default."""
        if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, Mapping) for t in tools)):
            raise KawaiError("tools must be a list of objects")
        variables = {
            **self._special,
            **_plain(extra),
            "messages": _prepare_messages(messages),
            "tools": _plain(tools),
            "documents": None,
            "add_generation_prompt": bool(add_generation_prompt),
        }
        if enable_thinking is not None:
            variables["enable_thinking"] = bool(enable_thinking)
        budget = _RenderBudget(self._max_iterations, self._max_seconds)
        token = _BUDGET.set(budget)
        chunks: list[str] = []
        size = 0
        try:
            for chunk in self._template.generate(variables):
                size += len(chunk)
                if size > self._max_chars:
                    raise TemplateLimitError(f"chat template output is longer than {self._max_chars} characters")
                budget._tick()
                chunks.append(chunk)
        except KawaiError:
            raise
        except jinja2.TemplateError as e:
            raise KawaiError(f"chat template: {e.message}") from None
        except RecursionError:
            raise KawaiError("chat template recursed too deeply") from None
        except Exception as e:  # a template is code: TypeError, ZeroDivisionError, OverflowError, MemoryError...
            raise TemplateFailedError(f"chat template failed: {type(e).__name__}: {e}") from None
        finally:
            _BUDGET.reset(token)
        return "".join(chunks)
