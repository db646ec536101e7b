"""A chat template from a compiled directory, rendered within bounds.

transformers renders chat templates in jinja2's ImmutableSandboxedEnvironment, which stops a
template from reaching Python's internals but not from spending: ``"x" * 10**10`` allocates ten
gigabytes, nested ``range`` loops run for hours, a macro that doubles a string recurses to
terabytes. ``render_chat`` renders the same template with transformers' own filters, globals and
extensions (read from its compiled template, not copied) in a sandbox that also bounds what it
builds: no string or list past ``max_chars``, no number argument past it, no format width of six
digits, at most ``MAX_STEPS`` template lines run, and the output capped. The text is exactly what
``apply_chat_template(..., tokenize=False)`` gives whenever it stays inside the bounds.
"""

from __future__ import annotations

import re
import sys
from typing import Any

from .manifest import LoadError

MAX_STEPS = 10**6  # template lines run; real chat templates run a few thousand for a long chat
MIN_CHARS = 2**20  # the rendered text and every value built on the way: at least 1 Mi characters,
#                    or 16 times the messages' size (templates wrap messages in a few tokens each)
MAX_BITS = 4096  # an integer a template computes: squaring in a loop would grow it without end
_WIDE_FORMAT = re.compile(r"\d{6}")  # "%1000000d", "{:>1000000}": a 1M-character field


class TemplateLimit(Exception):
    """The template went past a bound (raised inside the sandbox, reported as LoadError)."""


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """``tokenizer.apply_chat_template(messages, add_generation_prompt=..., tokenize=False)``, bounded
    in time and memory; a one-line LoadError for a template that fails, runs past its bounds or
    renders no text."""
    import jinja2
    from jinja2.sandbox import SecurityError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        source = tokenizer.get_chat_template()
    except ValueError as exc:
        raise LoadError(f"the tokenizer has no usable chat template ({str(exc).splitlines()[0]})") from None
    max_chars = max(MIN_CHARS, 16 * sum(len(str(v)) for m in messages for v in m.values()))
    try:
        # transformers' environment, from an empty template: compiling the stranger's template there
        # would fold its constants unbounded ('a'|center(10**9) runs at compile time)
        reference = _compile_jinja_template("").environment
        env = _bounded_environment(reference, max_chars)
        template = env.from_string(source)
        text = _run(template, max_chars, messages=messages, tools=None, documents=None,
                    add_generation_prompt=add_generation_prompt, **tokenizer.special_tokens_map)
    except TemplateLimit as exc:
        raise LoadError(f"the chat template {exc}; it is not a template a real model ships") from None
    except (SecurityError, jinja2.TemplateError, ArithmeticError, RecursionError, TypeError, ValueError,
            AttributeError, KeyError, IndexError) as exc:
        why = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise LoadError(f"the chat template fails ({type(exc).__name__}: {why}); drop --chat or fix the "
                        "model's chat template") from None
    if not text:
        raise LoadError("the chat template rendered no text for this conversation; drop --chat or fix the "
                        "model's chat template")
    return text


def _run(template: Any, max_chars: int, **context: Any) -> str:
    """Renders with a line budget: a tracer counts the lines of the template's own code (the
    frames jinja compiled from it), and the output stops at ``max_chars``."""
    steps = 0
    code = template.root_render_func.__code__.co_filename

    def local(frame: Any, event: str, arg: Any) -> Any:
        nonlocal steps
        if event == "line":
            steps += 1
            if steps > MAX_STEPS:
                raise TemplateLimit(f"ran more than {MAX_STEPS} steps")
        return local

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_filename == code else None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        parts, size = [], 0
        for chunk in template.generate(**context):
            size += len(chunk)
            if size > max_chars:
                raise TemplateLimit(f"rendered more than {max_chars} characters")
            parts.append(chunk)
    finally:
        sys.settrace(previous)
    return "".join(parts)


def _bounded_environment(reference: Any, max_chars: int) -> Any:
    """An ImmutableSandboxedEnvironment like ``reference`` (same options, extensions, filters and
    globals) whose operators, calls, filters and concatenations check the sizes they would build."""
    from jinja2.compiler import CodeGenerator
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def size(value: Any) -> int:
        if isinstance(value, (str, bytes)):
            return len(value)
        if isinstance(value, (list, tuple, dict)):  # one level: what a join or a repeat copies
            return len(value) + sum(len(v) for v in value if isinstance(v, (str, list, tuple, dict)))
        return 0

    def check_args(what: str, args: Any) -> None:
        for value in args:
            if type(value) is int and abs(value) > max_chars:
                raise TemplateLimit(f"passes {value} to {what}, more than {max_chars}")
            if size(value) > max_chars:
                raise TemplateLimit(f"passes {size(value)} characters to {what}, more than {max_chars}")
            if isinstance(value, str) and "format" in what and _WIDE_FORMAT.search(value):
                raise TemplateLimit(f"formats a field of a million characters or more ({value[:40]!r})")

    def checked(what: str, value: Any) -> Any:
        if type(value) is int and value.bit_length() > MAX_BITS:
            raise TemplateLimit(f"built a number of {value.bit_length()} bits in {what}")
        if size(value) > max_chars:
            raise TemplateLimit(f"built {size(value)} characters in {what}, more than {max_chars}")
        return value

    class Generator(CodeGenerator):
        def visit_Concat(self, node: Any, frame: Any) -> None:  # ``a ~ b``: through the size check
            self.write("environment.concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+", "%"})
        code_generator_class = Generator

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "*":
                count, thing = (right, left) if type(right) is int else (left, right)
                if type(count) is int and size(thing) * max(count, 0) > max_chars:
                    raise TemplateLimit(f"repeats {size(thing)} characters {count} times")
            elif operator == "**" and type(left) is int and type(right) is int and \
                    left.bit_length() * right > MAX_BITS:
                raise TemplateLimit(f"raises a number to the power {right}")
            elif operator == "+" and size(left) + size(right) > max_chars:
                raise TemplateLimit(f"joins {size(left) + size(right)} characters, more than {max_chars}")
            elif operator == "%" and isinstance(left, str):
                check_args("format", [left, *(right if isinstance(right, tuple) else (right,))])
            return checked(operator, super().call_binop(context, operator, left, right))

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
            name = getattr(__obj, "__name__", type(__obj).__name__)
            owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)  # "...".format's string
            check_args(name, [*args, *kwargs.values(), owner])
            return checked(name, super().call(__context, __obj, *args, **kwargs))

        def concat(self, values: tuple[Any, ...]) -> str:
            return checked("~", "".join(checked("~", str(v)) for v in values))

    env = Bounded(**{k: getattr(reference, k) for k in ("trim_blocks", "lstrip_blocks", "keep_trailing_newline")},
                  extensions=[type(e) for e in reference.extensions.values()])
    for name, fn in reference.filters.items():
        env.filters[name] = _bounded_filter(name, fn, check_args, checked)
    env.globals.update({k: v for k, v in reference.globals.items() if k not in env.globals})
    env.globals.pop("lipsum", None)  # lipsum(n) writes n paragraphs; no chat template needs it
    return env


def _bounded_filter(name: str, fn: Any, check_args: Any, checked: Any) -> Any:
    """``fn`` with its arguments and result size-checked; jinja's pass_context marks are kept."""
    def bounded(*args: Any, **kwargs: Any) -> Any:
        check_args(f"the {name} filter" + (" (format)" if name == "format" else ""), [*args, *kwargs.values()])
        return checked(f"the {name} filter", fn(*args, **kwargs))

    bounded.__dict__.update(getattr(fn, "__dict__", {}))  # jinja_pass_arg: whether the context comes first
    return bounded
