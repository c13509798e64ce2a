"""The package's folders follow the data flow, and who imports whom says so (onlinespec/__init__.py).

Read from the source with ``ast`` (imports inside functions included): a module that reaches
upward, say the engine importing a learner, fails here with the offending line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("decode", "feedback", "learn", "drafters", "ops", "demo", "vllm_backend")
# folder -> the folders and processes (or single modules) it must not import
FORBIDDEN = {
    "feedback": {"decode", "learn", "drafters", "ops", "serving", "workers"},
    "decode": {"learn", "ops", "serving", "workers"},
    "drafters": {"learn", "ops", "serving", "workers"},
    "learn": {"ops", "serving", "workers"},
    "vllm_backend": {"learn", "ops", "serving", "workers"},  # runs inside vLLM: drafting, not learning
    # the shared modules are loaded by every process: not the learners, nor the engine itself
    "shared": {"learn", "ops", "serving", "workers", "onlinespec.decode.engine", "onlinespec.decode.batch"},
    "cli.py": set(),  # the command: it runs every tool and starts the server and the worker
}


def imported(source: str) -> list[tuple[int, str]]:
    tree = ast.parse(source)
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [(node.lineno, node.module)]
            names += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return names


def area(name: str) -> str | None:
    """'onlinespec.learn.registry' -> 'learn'; 'serving.app' -> 'serving'."""
    parts = name.split(".")
    if parts[0] in ("serving", "workers"):
        return parts[0]
    if parts[0] != "onlinespec" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in FOLDERS else "shared"


def modules() -> list[Path]:
    return sorted(p for p in (ROOT / "onlinespec").rglob("*.py") if "prompts" not in p.parts)


def violations(rel: Path, source: str) -> list[str]:
    """``rel``: the module's path inside onlinespec/."""
    if len(rel.parts) > 1:
        own = rel.parts[0]  # a folder
    else:
        own = rel.name if rel.name in FORBIDDEN else "shared"  # a top-level module with a rule of its own, or shared
    forbidden = FORBIDDEN.get(own, set())
    return [f"onlinespec/{rel}:{line} imports {name}" for line, name in imported(source)
            if area(name) in forbidden or ".".join(name.split(".")[:3]) in forbidden]


def test_the_folders_exist_and_say_what_they_own():
    for folder in ("decode", "feedback", "learn", "drafters", "ops", "vllm_backend"):
        init = ROOT / "onlinespec" / folder / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "may import" in doc.lower(), f"{init} says what it may import"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_layering(path):
    assert violations(path.relative_to(ROOT / "onlinespec"), path.read_text()) == []


def test_the_check_catches_an_upward_import():
    """A decode module importing the learner, or feedback importing decode, is reported."""
    probe = "import torch\n\ndef f():\n    from onlinespec.learn.learner import DrafterLearner\n"
    assert violations(Path("decode/probe.py"), probe) == [
        "onlinespec/decode/probe.py:4 imports onlinespec.learn.learner",
        "onlinespec/decode/probe.py:4 imports onlinespec.learn.learner.DrafterLearner"]
    assert violations(Path("feedback/probe.py"), "from onlinespec.decode import engine\n") != []
    assert violations(Path("ops/probe.py"), "from serving.app import create_app\n") == []


def test_the_processes_stay_apart():
    """The server never imports the workers, nor the workers the server."""
    for process, other in (("serving", "workers"), ("workers", "serving")):
        for path in sorted((ROOT / process).rglob("*.py")):
            bad = [f"{path.relative_to(ROOT)}:{line} {name}" for line, name in imported(path.read_text())
                   if name.split(".")[0] == other]
            assert bad == []
