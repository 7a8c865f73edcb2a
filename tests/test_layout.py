"""The layout, read from the code: omni's packages are layers, every import goes down, nothing imports
in a circle, and the README's tree names every module.

The layers, bottom to top (README, "Layout"): a module may import the modules of lower layers and of
its own layer, never of a higher one; the imports inside each layer form no cycle either. Imports
inside functions count like the others, and only cli.py has any: it imports its handlers' modules
lazily so that `omni --help` does not load torch. A new module must be placed in a layer here.
"""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OMNI = REPO / "omni"

LAYERS = [
    ("foundation", ["omni", "omni.common", "omni.params", "omni.track", "omni.train"]),
    ("model", ["omni.model"]),
    ("data", ["omni.data"]),
    ("eval", ["omni.eval"]),
    ("experiments", ["omni.experiments"]),
    ("run", ["omni.run"]),
    ("serve", ["omni.serve"]),
    ("cli", ["omni.cli"]),
]
LAZY_OK = {"omni.cli"}  # start-up speed: a handler imports what it needs when it runs


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(OMNI.rglob("*.py"))}


def layer_of(module: str) -> int:
    """The index of the layer holding `module`: the longest prefix listed wins (omni.model.x -> model)."""
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + ".") and prefix != "omni":
                if best is None or len(prefix) > best[1]:
                    best = (i, len(prefix))
    assert best is not None, f"{module} is in no layer: add it to LAYERS in tests/test_layout.py (and to the README's tree)"
    return best[0]


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported omni module, line, inside a function) for every import statement of `path`."""
    tree = ast.parse(path.read_text(), str(path))
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_function |= {id(n) for n in ast.walk(node) if n is not node}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from omni.model import mel` imports the module omni.model.mel; `from omni.model.mel import log_mel` the module omni.model.mel
            targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module for a in node.names]
        else:
            continue
        out += [(t, node.lineno, id(node) in in_function) for t in targets if t == "omni" or t.startswith("omni.")]
    return out


GRAPH = {m: sorted({t for t, _, _ in imports(p) if t != m}) for m, p in MODULES.items()}


def test_every_module_is_in_a_layer_and_imports_only_downward():
    upward = []
    for module, path in MODULES.items():
        for target, line, _ in imports(path):
            assert target in MODULES, f"{path.relative_to(REPO)}:{line}: imports {target}, which is no omni module"
            if layer_of(target) > layer_of(module):
                upward.append(f"{path.relative_to(REPO)}:{line}: {module} ({LAYERS[layer_of(module)][0]}) imports "
                              f"{target} ({LAYERS[layer_of(target)][0]}), a higher layer")
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    """Depth-first search over every import (functions' included); a cycle is reported as the path that closes it."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in GRAPH[m]:
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in MODULES:
        if m not in state:
            cycle = visit(m)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_omni_imports_sit_at_the_top_of_a_module():
    lazy = [f"{p.relative_to(REPO)}:{line}: {t}" for m, p in MODULES.items() if m not in LAZY_OK
            for t, line, inside in imports(p) if inside]
    assert not lazy, "omni imports inside functions (move them to the top; only cli.py imports lazily):\n" + "\n".join(lazy)


def test_the_test_sees_the_imports_it_checks():
    """The checker itself, on known edges: a missed edge would pass every test above."""
    assert "omni.model.encoder" in GRAPH["omni.data.features"]  # data may use the model
    assert "omni.experiments.audio_run" in GRAPH["omni.experiments.alignment"]  # within a layer, downward
    assert "omni.run.runner" in GRAPH["omni.cli"]  # cli's lazy imports are edges too
    assert layer_of("omni.model.mel") == 1 and layer_of("omni.train") == 0 and layer_of("omni.cli") == len(LAYERS) - 1


def test_readme_opens_with_a_tree_naming_every_module():
    readme = (REPO / "README.md").read_text()
    assert re.findall(r"^## (.+)$", readme, re.M)[:2] == ["The two commands", "Layout"], "the tree comes right after the two commands"
    tree = readme[readme.index("\n## Layout") :].split("```")[1]
    names = re.findall(r"([\w.]+\.py)\b", tree)
    for module, path in MODULES.items():
        if path.name == "__init__.py":
            continue
        want = sum(p.name == path.name for p in MODULES.values())
        assert names.count(path.name) >= want, f"the README's tree does not list {path.relative_to(REPO)}"


def test_every_progress_bar_goes_through_one_switch():
    """tqdm is imported by omni.common alone: every bar of omni is common.progress, which TQDM_DISABLE
    (set by `omni run`) turns off, so no report fills with progress lines (a bar made with tqdm's own
    `disable=` argument ignores that variable)."""
    users = [str(p.relative_to(REPO)) for m, p in MODULES.items() if m != "omni.common"
             and re.search(r"^\s*(from tqdm|import tqdm)", p.read_text(), re.M)]
    assert not users, f"make these bars with omni.common.progress: {users}"
