"""Chat-template rendering: a checkpoint's own Jinja template, rendered as HF transformers does.

The environment matches transformers' `render_jinja_template`: an immutable sandbox with
`trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, a `{% generation %}` block tag
(rendered as its body), a `tojson` filter that keeps non-ASCII text and takes indent/separators,
and the globals `raise_exception`, `strftime_now`, `dict` and a `namespace` that rejects
underscore names. Messages are first copied into plain JSON-like data (media objects become
"<TypeName>" strings, since templates only test whether a media key is present), and reasoning
given as `thinking`/`reasoning` is also offered as `reasoning_content`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.exceptions
import jinja2.nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from qwenvl_jax.errors import ConfigError, InputError

_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _DictFactory:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without exposing the type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _SafeNamespace(Namespace):
    """Jinja's `namespace()` that refuses attribute names starting with an underscore."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _SafeNamespace._check(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _SafeNamespace._check(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set underscore attributes on a namespace: {name!r}"
            )


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text in HF templates; here it
    renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in the sandboxed environment HF uses (cached by source text)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _DictFactory()
    env.globals["namespace"] = _SafeNamespace
    return env.from_string(source)


def plain_data(value: Any) -> Any:
    """A copy of `value` made only of str/int/float/bool/None, dicts, lists and tuples; any other
    object (an image, an array) becomes the string "<TypeName>"."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_data(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_data(v) for v in value)
    if hasattr(value, "dtype") and hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return plain_data(value.item())  # numpy scalars
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return f"<{type(value).__name__}>"


def _with_reasoning_aliases(message: dict) -> dict:
    reasoning = next((message[k] for k in _REASONING_KEYS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    **template_kwargs: Any,
) -> str:
    """Render one conversation. `template_kwargs` are extra template variables (HF passes the
    tokenizer's special tokens, e.g. `eos_token`, and user flags such as `add_vision_id`)."""
    chat = plain_data(list(messages))
    for message in chat:
        if not isinstance(message, dict):
            raise InputError(f"chat messages must be dicts, got {message!r}")
    chat = [_with_reasoning_aliases(m) for m in chat]
    try:
        compiled = compile_template(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ConfigError(f"the chat template does not parse: {e}") from e
    try:
        return compiled.render(
            messages=chat,
            tools=plain_data(list(tools)) if tools is not None else None,
            documents=plain_data(list(documents)) if documents is not None else None,
            add_generation_prompt=add_generation_prompt,
            **plain_data(template_kwargs),
        )
    except jinja2.exceptions.TemplateError as e:
        raise InputError(f"chat template error: {e}") from e
