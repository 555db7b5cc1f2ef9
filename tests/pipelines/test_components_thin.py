"""Components stay thin: stdlib + kfp at the top, a short body, one call into the library (or the registry), no
math of their own."""

import ast
import sys
from pathlib import Path

import pytest

COMPONENTS = Path(__file__).resolve().parents[2] / "components"
NOT_COMPONENTS = {"__init__.py", "mlflow_tracker.py"}  # components/glue/ is the shared glue
EXPECTED = {"start_tracking", "plan_shards", "preprocess", "merge", "train_vae", "train_dit", "evaluate", "register",
            "finish_tracking"}
MAX_STATEMENTS = 15
BODY_IMPORTS = ("components.glue", "easyanimate", "serving")  # what a component body may import
MATH = {"torch", "numpy", "np", "scipy", "cv2", "math", "mlflow"}  # never used by name in a component


def _component_files():
    return sorted(p for p in COMPONENTS.glob("*.py") if p.name not in NOT_COMPONENTS)


def _top_level_modules(tree):
    for node in tree.body:
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield "." * node.level + (node.module or "")


def _is_component(fn):
    for dec in fn.decorator_list:
        call = dec.func if isinstance(dec, ast.Call) else dec
        if isinstance(call, ast.Attribute) and call.attr == "component":
            return dec
    return None


def _allowed_at_top(module):
    root = module.split(".")[0]
    return root in sys.stdlib_module_names or root == "kfp" or module == "components" or module == "__future__"


def test_every_step_has_a_component_file():
    assert {p.stem for p in _component_files()} == EXPECTED


def test_package_init_imports_the_standard_library_only():
    tree = ast.parse((COMPONENTS / "__init__.py").read_text())
    assert all(m.split(".")[0] in sys.stdlib_module_names for m in _top_level_modules(tree))


@pytest.mark.parametrize("path", _component_files(), ids=lambda p: p.stem)
def test_component_is_thin(path):
    tree = ast.parse(path.read_text())
    bad = [m for m in _top_level_modules(tree) if not _allowed_at_top(m)]
    assert not bad, f"{path.name}: top-level imports must be stdlib/kfp only (and `components` for the image): {bad}"

    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef) and _is_component(n)]
    assert len(functions) == 1, f"{path.name}: expected one @dsl.component function"
    fn = functions[0]
    dec = _is_component(fn)
    kwargs = {k.arg: k.value for k in dec.keywords}
    assert isinstance(kwargs.get("install_kfp_package"), ast.Constant) and kwargs["install_kfp_package"].value is False
    assert isinstance(kwargs.get("base_image"), ast.Name) and kwargs["base_image"].id == "BASE_IMAGE"
    assert "packages_to_install" not in kwargs

    body = fn.body[1:] if (fn.body and isinstance(fn.body[0], ast.Expr)
                           and isinstance(fn.body[0].value, ast.Constant)) else fn.body
    statements = [n for stmt in body for n in ast.walk(stmt) if isinstance(n, ast.stmt)]
    assert len(statements) <= MAX_STATEMENTS, f"{path.name}: {len(statements)} statements (> {MAX_STATEMENTS})"

    imports = [n for stmt in body for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom))]
    modules = []
    for node in imports:
        if isinstance(node, ast.Import):
            modules += [a.name for a in node.names]
        elif node.module in ("components", "components.glue"):  # `from components.glue import tracking, …`
            modules += [f"{node.module}.{a.name}" for a in node.names]
        else:
            modules.append(node.module)
    assert modules and all(m.startswith(BODY_IMPORTS) for m in modules), f"{path.name}: body imports {modules}"
    assert any(m.startswith(("easyanimate", "serving", "components.glue")) for m in modules)

    names = {n.id for stmt in body for n in ast.walk(stmt) if isinstance(n, ast.Name)}
    assert not names & MATH, f"{path.name}: uses {sorted(names & MATH)} directly; put that in the library"
