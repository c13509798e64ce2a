"""Chat: rendering a conversation into prompt ids (the server's and the benches' one way), and
instruct-style chat prompts built from text every Python installation has offline.

Domains (each a list of single-turn ``messages``):

- ``edit``: "rewrite this function ..." over short standard-library functions: answers that
  reuse their input (what suffix speculation can copy);
- ``json``: "reformat this JSON ..." over small objects made from standard-library facts;
- ``explain``: "explain what this function does": answers in the model's own words;
- ``summarize``: "summarize this documentation" over standard-library docstrings;
- ``question``: "how do I use ``module.function``?": a code question answered with an example;
- ``story``: "write a short story about ...", from lists of characters, places and objects;
- ``data``: "turn this table into JSON", tables of standard-library facts (CSV rows in, JSON out).

The bundled SmolLM2 drafters were distilled on standard-library source and reference prose
(``onlinespec.drafters.distill``), which the first four domains quote; ``story`` and ``data``
are kept out of that text: domains to measure online learning on.

Deterministic: the same Python version gives the same prompts, in the same order.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import json
import random
import textwrap

__all__ = ["DOMAINS", "DEFAULT_CHAT_TEMPLATE", "FOLLOW_UPS", "chat_prompts", "render", "render_text"]

# Used when the tokenizer has no chat template of its own (the demo models have none).
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

DOMAINS = ("edit", "json", "explain", "summarize", "question", "story", "data")
# a conversation's next user turns (traffic of several turns: `onlinespec traffic --turns`, `bench prefix`)
FOLLOW_UPS = ("Now say that in one sentence.", "Why?", "Give another example.", "Make it shorter.")
_CHARACTERS = ("a lighthouse keeper", "a retired astronaut", "a young baker", "a lost robot", "two rival chess players",
               "a night-shift nurse", "a street musician", "a curious fox", "an old fisherman", "a village librarian",
               "a beekeeper", "a taxi driver", "a teenage inventor", "a tired detective", "a mountain guide")
_PLACES = ("on a foggy island", "in a crowded train station", "during a snowstorm", "in a small bakery at dawn",
           "on the last day of summer", "in an abandoned greenhouse", "at a noisy wedding", "in a desert town",
           "on a sinking ferry", "in a city without electricity", "at a county fair", "in a quiet hospital")
_OBJECTS = ("a broken compass", "an unsigned letter", "a jar of honey", "a music box", "a borrowed bicycle",
            "a map drawn in pencil", "a red umbrella", "a stopped clock", "a photograph", "a key with no lock")
_MODULES = ("textwrap", "shlex", "string", "fnmatch", "posixpath", "genericpath", "colorsys", "heapq", "calendar",
            "statistics", "base64", "html", "glob", "bisect", "copy", "csv", "difflib", "ftplib", "gettext",
            "netrc", "numbers", "operator", "pprint", "quopri", "random", "reprlib", "secrets", "sched", "shutil",
            "tempfile", "uu", "webbrowser", "zipfile", "filecmp", "fractions", "ipaddress", "mimetypes", "json")


# More modules, read after every function of _MODULES (so the first prompts stay what they were):
# more text for distilling on the target's answers. Modules deprecated in 3.11-3.13 stay out.
_MORE_MODULES = ("logging", "urllib.parse", "inspect", "tokenize", "ast", "dis", "dataclasses", "enum", "gzip",
                 "linecache", "locale", "optparse", "platform", "plistlib", "pydoc", "re", "shelve", "smtplib",
                 "socket", "subprocess", "sysconfig", "tabnanny", "tarfile", "threading", "timeit", "traceback",
                 "types", "typing", "urllib.request", "uuid", "warnings", "doctest", "email.utils",
                 "email.quoprimime", "email.base64mime", "pkgutil", "unittest.util", "wsgiref.util",
                 "http.cookiejar", "imaplib", "asyncio.tasks", "importlib.metadata", "xml.dom.minidom",
                 "xml.etree.ElementTree", "xml.sax.saxutils", "json.encoder", "getopt", "getpass",
                 "pickletools", "profile", "pstats", "pyclbr", "tracemalloc", "argparse", "configparser",
                 "collections", "pathlib", "queue", "selectors", "socketserver", "mailbox", "zipimport",
                 "concurrent.futures._base", "logging.handlers", "http.client", "email.message", "email.feedparser")


def _modules(names):
    for name in names:
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - absent on this Python: fewer prompts, same order
            continue
        yield name, module


def _fits(obj, min_lines: int, max_lines: int) -> str | None:
    try:
        source = inspect.getsource(obj)
    except (OSError, TypeError):
        return None
    return source if min_lines <= source.count("\n") <= max_lines else None


def _functions(min_lines: int = 4, max_lines: int = 22):
    """(module name, function's name in it, source, docstring, the function): the public
    functions of _MODULES, then of _MORE_MODULES, then the public methods of both's classes."""
    for name, module in _modules(_MODULES + _MORE_MODULES):
        for fname, obj in sorted(inspect.getmembers(module, inspect.isfunction)):
            if obj.__module__ != module.__name__ or fname.startswith("_"):
                continue
            source = _fits(obj, min_lines, max_lines)
            if source is not None:
                yield name, fname, source.rstrip(), inspect.getdoc(obj) or "", obj
    for name, module in _modules(_MODULES + _MORE_MODULES):
        for cname, cls in sorted(inspect.getmembers(module, inspect.isclass)):
            if cls.__module__ != module.__name__ or cname.startswith("_"):
                continue
            for mname, obj in sorted(vars(cls).items()):
                if not inspect.isfunction(obj) or mname.startswith("_"):
                    continue
                source = _fits(obj, min_lines, max_lines)
                if source is not None:
                    yield name, f"{cname}.{mname}", textwrap.dedent(source).rstrip(), inspect.getdoc(obj) or "", obj


def _stories(n: int) -> list[list[dict]]:
    combos = list(itertools.product(_CHARACTERS, _PLACES, _OBJECTS))
    random.Random(0).shuffle(combos)  # a fixed order in which consecutive prompts share little
    out = []
    for who, where, what in combos[:n]:
        out.append([{"role": "user", "content": f"Write a short story, about 120 words, about {who} {where} "
                                                f"who finds {what}."}])
    return out


def _tables(n: int) -> list[list[dict]]:
    def chunks():
        """(module, up to six rows), made as _functions reads the library: a module's functions
        (later its methods) come one after the other, so a few tables do not read all of it."""
        for (module, _), group in itertools.groupby(_functions(), key=lambda f: (f[0], "." in f[1])):
            rows = [(fname, source.count("\n") + 1, bool(doc)) for _, fname, source, doc, _ in group]
            for i in range(0, len(rows), 6):
                yield module, rows[i:i + 6]

    out = []
    for module, rows in itertools.islice(chunks(), n):
        table = "\n".join(["function,lines,documented"] + [f"{f},{lines},{'yes' if d else 'no'}" for f, lines, d in rows])
        out.append([{"role": "user", "content": f"Convert this CSV table about the Python module `{module}` into a JSON "
                                                f"list of objects with the keys function, lines and documented:\n\n{table}"}])
    return out


def chat_prompts(domain: str, n: int) -> list[list[dict]]:
    """``n`` single-turn conversations of ``domain`` (fewer if the text runs out)."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown chat domain {domain!r}; known: {DOMAINS}")
    if domain == "story":
        return _stories(n)
    if domain == "data":
        return _tables(n)
    out: list[list[dict]] = []
    for module, fname, source, doc, obj in _functions():
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
        elif domain == "question":
            text = f"How do I use `{module}.{fname}` in Python? Show a short example and explain it briefly."
        else:
            sig = str(inspect.signature(obj))
            obj = {"module": module, "function": fname, "signature": sig, "lines": source.count("\n") + 1,
                   "documented": bool(doc)}
            text = "Reformat this JSON with one key per line and 2-space indentation:\n\n" + json.dumps(obj)
        out.append([{"role": "user", "content": text}])
    return out


def render_text(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                continue_final_message: bool = False, template_kwargs: dict | None = None) -> str:
    """A conversation through the tokenizer's chat template (or the default), ready to answer
    (``add_generation_prompt``), or ready to go on with its last message (``continue_final_message``:
    the text ends inside it, as a client that writes the beginning of the answer wants).
    ``template_kwargs``: more variables for the template (vLLM's ``chat_template_kwargs``)."""
    template = getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt,
                                         continue_final_message=continue_final_message, **(template_kwargs or {}))


def render(tokenizer, messages: list[dict], **options) -> list[int]:
    """Prompt ids of a conversation, exactly as the server makes them (``options``: :func:`render_text`'s)."""
    return tokenizer.encode(render_text(tokenizer, messages, **options))
