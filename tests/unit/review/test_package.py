"""The review side is one package apart from the write side, with no import circle inside it."""

from __future__ import annotations

import ast
from pathlib import Path

import raypose

PACKAGE = Path(raypose.__file__).parent


def raypose_imports(path: Path) -> set[str]:
    """The raypose modules a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("raypose."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("raypose."))
    return found


def test_the_review_modules_import_each_other_without_a_circle():
    graph = {f"raypose.review.{p.stem}": {m for m in raypose_imports(p) if m.startswith("raypose.review.")}
             for p in (PACKAGE / "review").glob("*.py") if p.stem != "__init__"}
    assert "raypose.review.render" in graph and "raypose.review.qa_page" in graph
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, " -> ".join(path + (module,))
        if module not in done:
            for dep in graph.get(module, ()):
                visit(dep, path + (module,))
            done.add(module)

    for module in graph:
        visit(module, ())


def test_the_write_side_never_imports_the_review_side_and_the_review_side_never_imports_ray():
    for path in (PACKAGE / "output").glob("*.py"):
        assert not any(m.startswith("raypose.review") for m in raypose_imports(path)), path
    for path in (PACKAGE / "review").glob("*.py"):
        # Reading an output needs no Ray; only read_keypoints(dataset=True) asks for a Ray Dataset, lazily.
        pipeline = {m for m in raypose_imports(path) if m.startswith("raypose.pipeline")}
        assert pipeline <= {"raypose.pipeline.datasets"}, path
        assert not pipeline or path.name == "reading.py", path
        assert "import ray\n" not in path.read_text(), path
