"""Tool calls in a chat template's own syntax, for models trained to write them that way.

A template that writes `tools` into the prompt has a way the model writes its calls; the three shapes met in
practice are here, each found by what its template says:

- `hermes` (Hermes, Qwen 2.5/3 and most fine-tunes): text, then one or more
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks;
- `llama3` (Llama 3.1-3.3's JSON tool calling): the whole answer is one `{"name": ..., "parameters": {...}}`;
- `mistral` (Mistral v0.3, Nemo, Small): `[TOOL_CALLS]` and then every call in one JSON list
  `[{"name": ..., "arguments": {...}}, ...]`.

The grammar is lazy for `"auto"`, as llama.cpp's: the model writes freely until it writes the opener (llguidance's
lazy lexeme, or the special token when the vocabulary has one), and from there it can only write valid calls, each
naming a function and matching its parameters' schema. `"required"` and a named function start with the opener.
The answer is read back by the same syntax: the text outside the calls is the content, the calls OpenAI's.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import secrets
import string
from dataclasses import dataclass
from typing import Any, Callable

from .structured import json_term

ID_ALPHABET = string.ascii_letters + string.digits


@dataclass(frozen=True)
class ToolSyntax:
    """How one family of chat templates has its model write tool calls."""

    name: str
    markers: tuple[str, ...]  # what a template that writes calls this way says (all of them)
    opener: str  # what begins the calls ("" : a call is the whole answer, from its first "{")
    closer: str = ""  # what ends each call
    arguments: str = "arguments"  # the key a call's arguments are under
    listed: bool = False  # every call in one JSON list after the opener
    one_call: bool = False  # the template renders one call per turn
    short_ids: bool = False  # the template wants call ids of 9 letters and digits

    def new_call_id(self) -> str:
        if self.short_ids:
            return "".join(ID_ALPHABET[b % len(ID_ALPHABET)] for b in secrets.token_bytes(9))
        return f"call_{secrets.token_hex(12)}"

    def history_id(self, call_id: str) -> str:
        """A call id from the conversation as the template accepts it (the same id always maps the same way, so
        a call and its result still match)."""
        if not self.short_ids or (len(call_id) == 9 and call_id.isalnum() and call_id.isascii()):
            return call_id
        digest = hashlib.sha256(call_id.encode()).digest()
        return "".join(ID_ALPHABET[b % len(ID_ALPHABET)] for b in digest[:9])


HERMES = ToolSyntax("hermes", ("<tool_call>",), "<tool_call>", closer="</tool_call>")
LLAMA3 = ToolSyntax("llama3", ("<|start_header_id|>", "ipython"), "", arguments="parameters", one_call=True)
MISTRAL = ToolSyntax("mistral", ("[TOOL_CALLS]",), "[TOOL_CALLS]", listed=True, short_ids=True)
SYNTAXES = (MISTRAL, HERMES, LLAMA3)  # the first whose markers a template has


@functools.lru_cache(maxsize=8)
def syntax_of(template: str | None) -> ToolSyntax | None:
    """The tool-call syntax of a chat template that writes `tools` into the prompt; None when it has none."""
    if not template or "tools" not in template:
        return None
    return next((s for s in SYNTAXES if all(marker in template for marker in s.markers)), None)


@dataclass(frozen=True)
class NativeTools:
    """A model's template syntax, and the id of its opener when the vocabulary has it as one special token."""

    syntax: ToolSyntax
    opener_token: int | None = None

    def grammar(self, functions: dict[str, dict[str, Any]], names: list[str], *, auto: bool, max_calls: int) -> str:
        """The llguidance grammar (lark) of an answer that may (auto) or must call one of `names`."""
        syntax = self.syntax
        calls = [{"type": "object", "additionalProperties": False, "required": ["name", syntax.arguments],
                  "properties": {"name": {"const": n}, syntax.arguments: functions[n]["parameters"]}} for n in names]
        call: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
        most = 1 if syntax.one_call else max_calls
        if syntax.listed:
            call = {"type": "array", "items": call, "minItems": 1, "maxItems": most}
        term = json_term(call)
        opener = f"<[{self.opener_token}]>" if self.opener_token is not None else json.dumps(syntax.opener)
        lines = ["%llguidance {}"]
        if not syntax.opener:  # the call is the whole answer; text never starts with "{"
            lines += [f"start: {term}" + (" | PLAIN" if auto else ""), "PLAIN: /(\\s*[^\\s{](.|\\n)*)?/"]
            return "\n".join(lines) + "\n"
        # The opener where an answer that must call starts; after text that ends there where it may.
        start = "opened" if auto else opener
        if syntax.listed:  # the opener, then the list: the end of the answer
            lines.append(f"start: {start} {term}" + (" | PLAIN" if auto else ""))
        else:  # blocks, with text around them (or a newline between them)
            lines.append(f'call: {start} "\\n" {term} "\\n" {json.dumps(syntax.closer)}')
            more = f' ("\\n" call){{0,{most - 1}}}' if most > 1 else ""
            lines.append(f"start: call{{0,{most}}} PLAIN" if auto else f"start: call{more}")
        if auto and self.opener_token is not None:  # text cannot hold a special token: it ends where one comes
            lines += [f"opened: TEXT {opener}", "TEXT: /(.|\\n)*/", "PLAIN: /(.|\\n)*/"]
        elif auto:  # a lazy lexeme ends at the first opener; text after the last call cannot open another
            escaped = re.escape(syntax.opener).replace("/", "\\/")
            lines += [f"opened[lazy]: TEXT {opener}", "TEXT: /(.|\\n)*/",
                      f"PLAIN: /(.|\\n)*/ & ~/(.|\\n)*{escaped}(.|\\n)*/"]
        return "\n".join(lines) + "\n"

    def read(self, text: str, new_id: Callable[[], str]) -> tuple[str | None, list[dict[str, Any]]]:
        """(content, OpenAI tool_calls) of a finished answer; a call cut off by max_tokens is left out."""
        syntax, found, outside = self.syntax, [], text
        if not syntax.opener:
            stripped = text.lstrip()
            if not stripped.startswith("{"):
                return text or None, []
            found, outside = [_load(stripped)], ""
        elif syntax.listed:
            where = text.find(syntax.opener)
            if where >= 0:
                listed = _load(text[where + len(syntax.opener):])
                found, outside = (listed if isinstance(listed, list) else []), text[:where]
        else:
            pattern = re.compile(re.escape(syntax.opener) + r"(.*?)(?:" + re.escape(syntax.closer) + r"|\Z)", re.S)
            found = [_load(match.group(1)) for match in pattern.finditer(text)]
            outside = pattern.sub("", text)
        calls = [{"id": new_id(), "type": "function", "function": {
            "name": call["name"], "arguments": json.dumps(call[syntax.arguments])}}
            for call in found if isinstance(call, dict) and "name" in call and syntax.arguments in call]
        return (outside if outside.strip() else None), calls


def _load(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:  # cut by max_tokens
        return None


class NativeText:
    """An answer's text as it is generated, in a template's syntax: fed the raw pieces, it gives the text that is
    surely not part of a call (held back while it could still be the opener's beginning)."""

    __slots__ = ("syntax", "raw", "sent", "calling")

    def __init__(self, syntax: ToolSyntax) -> None:
        self.syntax = syntax
        self.raw = ""
        self.sent = 0
        self.calling = False

    def feed(self, piece: str) -> str:
        self.raw += piece
        if self.calling:
            return ""
        opener = self.syntax.opener
        if not opener:  # the first character that is not a space decides
            stripped = self.raw.lstrip()
            if not stripped:
                return ""
            if stripped.startswith("{"):
                self.calling = True
                return ""
            safe = len(self.raw)
        elif (where := self.raw.find(opener)) >= 0:
            self.calling, safe = True, where
        else:
            safe = len(self.raw) - _partial(self.raw, opener)
        new, self.sent = self.raw[self.sent:safe], max(self.sent, safe)
        return new


def _partial(text: str, opener: str) -> int:
    """The length of the longest end of `text` that begins `opener`."""
    for size in range(min(len(opener) - 1, len(text)), 0, -1):
        if opener.startswith(text[-size:]):
            return size
    return 0
