"""The package's import structure (README, code map): imports point one way, down the layers
below; nothing imports back up, no two modules import each other through any path, and what
`dcpo --help` loads stays light (no torch, pyarrow, transformers, ... at import time). In
tests/, what several test files need lives in conftest.py and helper modules, never in a
test module another one imports."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dcpo_cli"
TESTS = Path(__file__).resolve().parent

# Bottom to top. A module may import its own layer and the layers below it. Folders are named
# by their first component; the top-level modules by their own name.
LAYERS = [
    {"errors", "extras", "__init__"},
    {"fields"},
    {"options", "console", "quiet"},
    {"core"},
    {"parallel"},
    {"files"},
    {"policy", "trackers"},
    {"engines", "rewards"},
    {"stages", "train", "evaluate", "tiny", "serve"},
    {"run"},
    {"report"},
    {"commands"},
    {"cli", "__main__"},
]
HEAVY = {"torch", "pyarrow", "transformers", "vllm", "numpy", "safetensors", "math_verify",
         "datasets", "matplotlib", "peft", "huggingface_hub"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, top_level_only: bool = False) -> set[str]:
    """The modules `name` imports (dcpo_cli's own, resolved to modules; others by top name)."""
    tree = ast.parse(MODULES[name].read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # `from dcpo_cli.core import algorithms` names a module
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in MODULES else node.module)
    own = {m for m in found if m in MODULES}
    return own | {m.split(".")[0] for m in found - own if not m.startswith("dcpo_cli")}


def layer_of(name: str) -> int:
    parts = name.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    for index, members in enumerate(LAYERS):
        if key in members:
            return index
    raise AssertionError(f"{name}: in no layer of tests/test_layout.py; add its folder")


def test_every_module_has_a_layer():
    for name in MODULES:
        layer_of(name)


def test_no_import_runs_back_up():
    upward = [f"{name} -> {target}" for name in MODULES for target in imports_of(name)
              if target in MODULES and layer_of(target) > layer_of(name)]
    assert upward == []


def test_no_import_circles():
    graph = {name: {t for t in imports_of(name) if t in MODULES and t != name
                    and not (t == "dcpo_cli" or name.startswith(t + "."))}
             for name in MODULES}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                todo.extend(graph[node])
        return False

    circles = sorted(f"{a} <-> {b}" for a in graph for b in graph[a] if reaches(b, a))
    assert circles == []


def test_help_loads_only_light_modules():
    """What `import dcpo_cli.cli` runs: cli, the commands and their top-level imports, each
    free of heavy libraries at import time."""
    loaded, todo = set(), ["dcpo_cli.cli"]
    while todo:
        name = todo.pop()
        if name in loaded:
            continue
        loaded.add(name)
        parent = name.rpartition(".")[0]
        todo.extend(m for m in imports_of(name, top_level_only=True) | {parent}
                    if m in MODULES)
    heavy = {f"{name} imports {lib}" for name in loaded
             for lib in imports_of(name, top_level_only=True) & HEAVY}
    assert heavy == set()
    assert "dcpo_cli.train.step" not in loaded and "dcpo_cli.stages.rollout" not in loaded


def test_no_function_takes_more_than_six_positional_parameters():
    """The code map's rule: past six, parameters are keyword-only (`*,`), so a call reads
    what each value is and a new parameter cannot shift the others."""
    crowded = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                positional = [a.arg for a in node.args.posonlyargs + node.args.args
                              if a.arg not in ("self", "cls")]
                if len(positional) > 6:
                    crowded.append(f"{name}.{node.name}: {len(positional)}")
    assert crowded == []


def test_the_run_directory_is_named_in_one_light_module():
    """files/run_layout.py owns the run directory's names (no other module spells them) and
    imports only the standard library, so any layer may ask it."""
    owner = "dcpo_cli.files.run_layout"
    spelled = ('"metrics.jsonl"', '"state.json"', '"run.toml"', '"rollouts.parquet"',
               '"scored.parquet"', "rollouts-r{", "step-{", ":06d}")
    found = [f"{name}: {text}" for name, path in MODULES.items() if name != owner
             for text in spelled if text in path.read_text()]
    assert found == []
    assert imports_of(owner) <= {"__future__", "re", "pathlib"}


def test_no_test_module_imports_another():
    """A test file imports conftest.py and the helper modules (builders, fakes, loop_runs,
    servers), not another test_*.py: importing one would run its fixtures' definitions
    and tests' module code twice, and tie two files' helpers together by accident."""
    test_modules = {path.stem for path in TESTS.glob("test_*.py")}
    found = []
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            found += [f"{path.name}:{node.lineno} imports {name.strip('.')}" for name in names
                      if test_modules & set(name.split("."))]
    assert found == []
