"""The shape of the house: every module of pipeline/ is reachable from assets/ in at most two
import hops, and no pipeline/ module is longer than MAX_LINES unless the allowlist below says why.

Imports are read with ``ast`` (nothing is imported), at any depth of a module: the lazy imports inside
functions are dependencies too.  A hop may pass through resources/ (assets -> resources -> pipeline is the
house's layering: the sample generator is reached through the data-source resource).  Importing
``a.b.c`` reaches the packages ``a`` and ``a.b`` as well, as Python runs their ``__init__``; a package's
``__init__`` is its face, so reaching a module through what it re-exports costs no extra hop.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
MAX_HOPS = 2
PACKAGES = ("cli", "assets", "resources", "pipeline")
ENTRY_PACKAGES = ("cli", "assets")  # what users run: the command line and the Dagster definitions
# Which package may import which: each one only "down" this list (cli -> assets -> resources -> pipeline).
LAYER = {name: i for i, name in enumerate(PACKAGES)}
MAX_LINES = 450
# Modules allowed over MAX_LINES, each with its reason.  Shrink this list; do not grow it without one.
OVER_LENGTH_ALLOWED = {
    # One cohesive topic, the sample profile's procedural DiffusionDB (prompt grammar, filter bait,
    # rendering, writing parts in DiffusionDB's layout): long, but read top to bottom as one story.
    "pipeline/data/sample_data.py",
}
OVER_LENGTH_ALLOWED_PREFIXES: tuple[str, ...] = ()  # whole packages allowed over MAX_LINES (none now)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(*packages: str) -> dict[str, Path]:
    return {_module_name(p): p for package in packages for p in sorted((PROJECT / package).rglob("*.py"))}


def _imports(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports (absolute and relative; ``from pkg import sub`` names the submodule)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            # the module and its enclosing packages (``import a.b.c`` runs a and a.b too); for ``from a import x``
            # a.x when x is a submodule, else just a
            parts = target.split(".")
            found.update(".".join(parts[:k]) for k in range(1, len(parts) + 1) if ".".join(parts[:k]) in known)
    found.discard(name)
    return found


def _hops_from_assets() -> tuple[dict[str, int], dict[str, Path]]:
    """Fewest hops from any assets/ module to each module (0-1 BFS: a package's ``__init__`` is its face,
    so what it re-exports costs no extra hop)."""
    known = _modules(*PACKAGES)
    graph = {name: _imports(path, name, known) for name, path in known.items()}
    hops = {name: 0 for name in known if name.split(".")[0] in ENTRY_PACKAGES}
    queue = deque(hops)
    while queue:
        current = queue.popleft()
        cost = 0 if known[current].name == "__init__.py" else 1
        for nxt in graph[current]:
            if hops[current] + cost < hops.get(nxt, MAX_HOPS + 99):
                hops[nxt] = hops[current] + cost
                if cost == 0:
                    queue.appendleft(nxt)
                else:
                    queue.append(nxt)
    return hops, {n: p for n, p in known.items() if n.split(".")[0] == "pipeline"}


def test_every_pipeline_module_is_within_two_import_hops_of_assets():
    hops, pipeline_modules = _hops_from_assets()
    far = {name: hops.get(name) for name in pipeline_modules if hops.get(name, MAX_HOPS + 1) > MAX_HOPS}
    # None: no asset reaches it at all (dead code, or only tests and bench/ use it)
    assert far == {}, f"pipeline modules more than {MAX_HOPS} import hops from assets/: {far}"


def test_no_pipeline_module_is_over_length_unless_allowed():
    long = {}
    for path in sorted((PROJECT / "pipeline").rglob("*.py")):
        relative = path.relative_to(PROJECT).as_posix()
        lines = len(path.read_text().splitlines())
        if (
            lines > MAX_LINES
            and relative not in OVER_LENGTH_ALLOWED
            and not relative.startswith(OVER_LENGTH_ALLOWED_PREFIXES)
        ):
            long[relative] = lines
    assert long == {}, f"pipeline modules over {MAX_LINES} lines (split by concern, or allow with a reason): {long}"


def test_the_allowlists_name_real_modules():
    missing = sorted(p for p in OVER_LENGTH_ALLOWED if not (PROJECT / p).exists())
    assert missing == [], f"allowlisted modules that no longer exist: {missing}"


def test_the_import_reader_follows_relative_and_lazy_imports(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("def f():\n    from .b import g\n    from pkg import c\n")
    for name in ("b", "c"):
        (tmp_path / "pkg" / f"{name}.py").write_text("")
    known = {"pkg": tmp_path / "pkg" / "__init__.py", **{f"pkg.{n}": tmp_path / "pkg" / f"{n}.py" for n in "abc"}}
    assert _imports(known["pkg.a"], "pkg.a", known) == {"pkg", "pkg.b", "pkg.c"}


# Loading a checkpoint into a model is written once, in pipeline/training/checkpoint.py (load_model); the
# captioner passes load_model a factory that rebuilds its BLIP architecture.  Resuming training
# (pipeline/training/resume.py) reads the same weights back into the model being trained, with its optimizer.
WEIGHTS_READERS_ALLOWED = {"pipeline/training/checkpoint.py", "pipeline/training/resume.py"}
WEIGHTS_READERS_ALLOWED_PREFIXES: tuple[str, ...] = ()


def test_checkpoints_become_models_in_one_place():
    offenders = []
    for folder in ("assets", "resources", "pipeline"):
        for path in sorted((PROJECT / folder).rglob("*.py")):
            relative = path.relative_to(PROJECT).as_posix()
            if relative in WEIGHTS_READERS_ALLOWED or relative.startswith(WEIGHTS_READERS_ALLOWED_PREFIXES):
                continue
            for node in ast.walk(ast.parse(path.read_text(), filename=relative)):
                if isinstance(node, ast.Call):
                    name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                    if name == "load_model_weights":
                        offenders.append(f"{relative}:{node.lineno}")
    assert offenders == [], f"call pipeline.training.checkpoint.load_model instead: {offenders}"


def _import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports.  A module's own enclosing packages are left out: Python
    runs them first anyway, and a package ``__init__`` that re-exports its modules is their face, not a
    circle."""
    known = _modules(*PACKAGES)
    graph = {}
    for name, path in known.items():
        own = {".".join(name.split(".")[:k]) for k in range(1, name.count(".") + 1)}
        graph[name] = _imports(path, name, known) - own
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circles():
    assert _cycles(_import_graph()) == []


def test_the_cycle_finder_finds_a_circle_through_three_modules():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_imports_only_run_down_the_layers():
    upward = sorted(
        f"{name} -> {target}"
        for name, targets in _import_graph().items()
        for target in targets
        if LAYER[target.split(".")[0]] < LAYER[name.split(".")[0]]
    )
    assert upward == [], f"imports running back up (cli -> assets -> resources -> pipeline): {upward}"


def test_loading_the_definitions_imports_no_torch_sklearn_or_matplotlib():
    """The code server, every run worker and every `reverse-sd materialize` import the definitions; torch,
    scikit-learn and matplotlib (about 5 s together here) load only in the steps that use them."""
    import subprocess
    import sys

    probe = "import sys, assets.definitions; print(sorted({'torch', 'sklearn', 'matplotlib'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def _private_dagster_imports(path: Path) -> list[str]:
    """Every ``dagster._*`` module an ``import`` / ``from ... import`` statement names (also ``from dagster
    import _core``), wherever the statement sits (lazy imports inside functions included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("dagster._")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("dagster._"):
                found.append(node.module)
            elif node.module == "dagster":
                found += [f"dagster.{a.name}" for a in node.names if a.name.startswith("_")]
    return found


def test_product_code_uses_only_public_dagster_apis():
    offenders = {
        str(path.relative_to(PROJECT)): names
        for package in (*PACKAGES, "bench")
        for path in sorted((PROJECT / package).rglob("*.py"))
        if (names := _private_dagster_imports(path))
    }
    assert offenders == {}


def test_the_private_import_finder_sees_every_form(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import dagster as dg\nfrom dagster import AssetKey\nimport dagster._core.instance\n"
        "from dagster import _check\ndef f():\n    from dagster._utils import x\n"
    )
    assert _private_dagster_imports(probe) == ["dagster._core.instance", "dagster._check", "dagster._utils"]
