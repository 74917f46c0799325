"""The layering STYLE.md asks for, checked on the import statements of every module."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OURS = {"assistant", "feedback", "trainer", "evals", "app", "tuneloop"}
ALLOWED = {
    "assistant": set(),
    "feedback": {"assistant.paths", "assistant.config", "assistant.embeddings", "assistant.progress"},
    "trainer": {"assistant", "feedback"},
    "evals": {"assistant", "feedback"},
    "app": {"assistant", "feedback"},
    # The command and the nightly pipeline: the only code that imports every package.
    "tuneloop": {"assistant", "feedback", "trainer", "evals", "app"},
}


def imports_of(file: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in OURS:  # `from assistant import paths` imports assistant.paths
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
            else:
                names.add(node.module)
    return {name for name in names if name.split(".")[0] in OURS}


def allowed(layer: str, name: str) -> bool:
    top = name.split(".")[0]
    if top == layer:
        return True
    return any(name == rule or name.startswith(rule + ".") or (rule.count(".") == 0 and top == rule)
               for rule in ALLOWED[layer])


def test_each_layer_imports_only_what_it_may():
    offences = []
    for layer in ALLOWED:
        files = [REPO / f"{layer}.py"] if (REPO / f"{layer}.py").exists() else sorted((REPO / layer).rglob("*.py"))
        for file in files:
            for name in imports_of(file):
                if not allowed(layer, name):
                    offences.append(f"{file.relative_to(REPO)} imports {name}")
    assert not offences, "\n".join(offences)


def test_no_top_level_module_but_app():
    """A top-level ``cli.py`` or ``pipeline.py`` could be replaced by a file of that name in the
    directory a user runs a child process from; only ``app.py`` (the Gradio wiring) stays there."""
    modules = sorted(p.name for p in REPO.glob("*.py"))
    assert modules == ["app.py"], modules
