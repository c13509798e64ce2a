"""Chat: rendering a conversation into prompt ids (the server's and the benches' one way), and
instruct-style chat prompts built from text every Python installation has offline.

Domains (each a list of single-turn ``messages``):

- ``edit``: "rewrite this function ..." over short standard-library functions: answers that
  reuse their input (what suffix speculation can copy);
- ``json``: "reformat this JSON ..." over small objects made from standard-library facts;
- ``explain``: "explain what this function does": answers in the model's own words;
- ``summarize``: "summarize this documentation" over standard-library docstrings.

Deterministic: the same Python version gives the same prompts, in the same order.
"""

from __future__ import annotations

import importlib
import inspect
import json

__all__ = ["DOMAINS", "DEFAULT_CHAT_TEMPLATE", "chat_prompts", "render", "render_text"]

# Used when the tokenizer has no chat template of its own (the demo models have none).
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

DOMAINS = ("edit", "json", "explain", "summarize")
_MODULES = ("textwrap", "shlex", "string", "fnmatch", "posixpath", "genericpath", "colorsys", "heapq", "calendar",
            "statistics", "base64", "html", "glob", "bisect", "copy", "csv", "difflib", "ftplib", "gettext",
            "netrc", "numbers", "operator", "pprint", "quopri", "random", "reprlib", "secrets", "sched", "shutil",
            "tempfile", "uu", "webbrowser", "zipfile", "filecmp", "fractions", "ipaddress", "mimetypes", "json")


def _functions(min_lines: int = 4, max_lines: int = 22):
    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - absent on this Python: fewer prompts, same order
            continue
        for fname, obj in sorted(inspect.getmembers(module, inspect.isfunction)):
            if obj.__module__ != module.__name__ or fname.startswith("_"):
                continue
            try:
                source = inspect.getsource(obj)
            except (OSError, TypeError):
                continue
            if min_lines <= source.count("\n") <= max_lines:
                yield name, fname, source.rstrip(), inspect.getdoc(obj) or ""


def chat_prompts(domain: str, n: int) -> list[list[dict]]:
    """``n`` single-turn conversations of ``domain`` (fewer if the text runs out)."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown chat domain {domain!r}; known: {DOMAINS}")
    out: list[list[dict]] = []
    for module, fname, source, doc in _functions():
        if len(out) >= n:
            break
        if domain == "edit":
            text = f"Rewrite this Python function so that it uses f-strings where it builds strings. " \
                   f"Keep everything else exactly the same:\n\n```python\n{source}\n```"
        elif domain == "explain":
            text = f"Explain what this Python function does, in two sentences:\n\n```python\n{source}\n```"
        elif domain == "summarize":
            if len(doc) < 120:
                continue
            text = f"Summarize this documentation of `{module}.{fname}` in one sentence:\n\n{doc}"
        else:
            sig = str(inspect.signature(getattr(importlib.import_module(module), fname)))
            obj = {"module": module, "function": fname, "signature": sig, "lines": source.count("\n") + 1,
                   "documented": bool(doc)}
            text = "Reformat this JSON with one key per line and 2-space indentation:\n\n" + json.dumps(obj)
        out.append([{"role": "user", "content": text}])
    return out


def render_text(tokenizer, messages: list[dict]) -> str:
    """A conversation through the tokenizer's chat template (or the default), ready to answer."""
    template = getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)


def render(tokenizer, messages: list[dict]) -> list[int]:
    """Prompt ids of a conversation, exactly as the server makes them."""
    return tokenizer.encode(render_text(tokenizer, messages))
