"""The package layout (docs/architecture.md): every library module imports, the module import graph is
acyclic, sub-packages only import packages below them in the pipeline, no helper is defined twice, and
nothing in the repository points outside it.

The graph is read from the source (every ``import`` statement, also those inside functions), not from
``sys.modules``, so an import hidden in a function counts as much as a top-level one."""
from __future__ import annotations

import ast
import importlib
import re
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top; a package may import itself and any package before it, never one after it.
LAYERS = ("util", "distributed", "transforms", "formats", "kernels", "models", "data", "calibration", "rotation",
          "quant", "learn", "runtime", "eval", "pipeline", "cli")

# Names that are meant to exist once per program, not shared helpers.
PER_MODULE_NAMES = {"main", "parse_args", "run"}
# One operation, one implementation per backend: the jnp reference (kernels.gemm_reference, dispatched by
# kernels.mixed_gemm) and the Triton kernels (kernels.triton) carry the same names on purpose.
BACKEND_OPS = {"quantize_pack", "mixed_gemm", "int_accumulators", "_block_term"}


def _library_modules() -> dict[str, Path]:
    """{dotted module name: source file} of the installed package (models/ installs as resq_jax.models)."""
    out = {}
    for base, prefix in ((ROOT / "resq_jax", "resq_jax"), (ROOT / "models", "resq_jax.models")):
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = path
    return out


MODULES = _library_modules()


def _imports(name: str, path: Path) -> set[str]:
    """Library modules that module ``name`` imports (``from pkg import mod`` counts as pkg.mod)."""
    out = set()
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in MODULES and t != name}
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_imports(module):
    needs = {"resq_jax.kernels.triton.kernels": "triton", "resq_jax.kernels.triton.jax_ops": "jax_triton"}
    if module in needs:  # GPU-only extras (pip install ".[gpu]")
        pytest.importorskip(needs[module])
    importlib.import_module(module)


def test_models_folder_is_resq_jax_models():
    import resq_jax.models.decoder as decoder

    assert Path(decoder.__file__).resolve() == ROOT / "models" / "decoder.py"


def test_import_graph_is_acyclic():
    """Depth-first search for a back edge; the failure names the cycle."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(GRAPH[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_packages_import_only_down_the_pipeline():
    assert set(LAYERS) == {_layer(m) for m in MODULES if _layer(m)}, "a package is missing from LAYERS"
    rank = {p: i for i, p in enumerate(LAYERS)}
    bad = [f"{m} imports {n}" for m, deps in GRAPH.items() for n in deps
           if _layer(m) and _layer(n) and rank[_layer(n)] > rank[_layer(m)]]
    assert not bad, "imports pointing up the pipeline:\n" + "\n".join(sorted(bad))


def test_no_helper_defined_twice():
    """Top-level functions and classes, public or private, have one definition in the library."""
    where = defaultdict(list)
    for name, path in MODULES.items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                where[node.name].append(name)
    twice = {k: v for k, v in where.items() if len(v) > 1 and k not in PER_MODULE_NAMES | BACKEND_OPS}
    assert not twice, f"defined in several modules: {twice}"


def test_no_private_names_imported_across_modules():
    bad = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("resq_jax"):
                bad += [f"{name}: from {node.module} import {a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, "\n".join(bad)


def test_repository_cites_nothing_outside_it():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not files:
        pytest.skip("not a git checkout")
    pattern = re.compile(r"shared/|REFERENCE\.md|DESIGN\.md|DATA\.md")
    hits = []
    for f in files:
        p = ROOT / f
        if p.suffix in {".py", ".md", ".toml", ".txt", ".cc", ".cu", ".h", ".bzl", ""} and p.is_file():
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
                if pattern.search(line) and p.name != "test_layout.py":
                    hits.append(f"{f}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_docs_exist_and_readme_links_them():
    readme = (ROOT / "README.md").read_text()
    for doc in ("architecture", "algorithms", "formats", "reproducing"):
        assert (ROOT / "docs" / f"{doc}.md").is_file()
        assert f"docs/{doc}.md" in readme
