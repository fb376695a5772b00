"""The package's folders are layers (docs/architecture.md): a module imports from its own folder
or from a layer below it, never upward or sideways, and only the device layer's own modules
import torch_xla or set up torch.distributed. Read from the source (every import statement,
also inside functions), so an import that runs only in one command is checked too."""

from __future__ import annotations

import ast
import os

import pytest

from helpers import ROOT

PACKAGE = os.path.join(ROOT, "pyact_torch")

# lowest first; a unit is a folder of pyact_torch or one of its top-level modules
LAYERS = (
    ("errors", "model"),
    ("io",),
    ("config",),
    ("draw",),
    ("data",),
    ("training",),
    ("scoring", "detection", "convert"),
    ("demo",),
    ("cli",),
    ("__main__",),
)
LAYER = {unit: level for level, units in enumerate(LAYERS) for unit in units}
ONLY = {"torch_xla": {"pyact_torch.training.xla"}, "torch.distributed": {"pyact_torch.training.distributed"}}


def module_name(path: str) -> str:
    parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, module: str, is_package: bool) -> list[str]:
    """Every module ``source`` (the text of ``module``) imports, as absolute dotted names."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # ``from . import storage`` imports a module; ``from .x import name`` a name of x
            found += [f"{target}.{alias.name}" for alias in node.names] if not node.module else [target]
    return found


def unit(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if parts[0] == "pyact_torch" and len(parts) > 1 else None


def violations(module: str, imported: list[str]) -> list[str]:
    """What ``module`` may not import, one line each."""
    found, here = [], unit(module)
    for name in imported:
        for library, allowed in ONLY.items():
            if (name == library or name.startswith(library + ".")) and module not in allowed:
                found.append(f"{module} imports {name}: only {', '.join(sorted(allowed))} may")
        there = unit(name)
        if here is None or there is None or there == here or there.startswith("_"):
            continue  # the package itself (its __doc__ and version), or the module's own folder
        if there not in LAYER:
            found.append(f"{module} imports {name}: {there} is in no layer of this test")
        elif LAYER[there] >= LAYER[here]:
            found.append(f"{module} ({here}) imports {name} ({there}): not a layer below")
    return found


def package_modules() -> list[tuple[str, str, bool]]:
    found = []
    for folder, _, files in os.walk(PACKAGE):
        for file in sorted(files):
            if file.endswith(".py"):
                path = os.path.join(folder, file)
                with open(path, encoding="utf-8") as handle:
                    found.append((module_name(path), handle.read(), file == "__init__.py"))
    return found


def test_every_unit_has_a_layer():
    units = {unit(module) for module, _, _ in package_modules()} - {None, "__init__"}
    assert units == set(LAYER), (
        "a new folder or top-level module needs its place in LAYERS (and in docs/architecture.md)"
    )


def test_folders_import_only_downward():
    modules = package_modules()
    assert len(modules) > 40  # the walk found the package
    found = [
        line
        for module, source, is_package in modules
        for line in violations(module, imports(source, module, is_package))
    ]
    assert found == []


def test_every_folder_says_what_it_holds():
    for module, source, is_package in package_modules():
        if is_package and module != "pyact_torch":
            docstring = ast.get_docstring(ast.parse(source)) or ""
            assert "May import" in docstring, f"{module}/__init__.py: say what the folder holds and may import"


@pytest.mark.parametrize(
    "module, source, expected",
    [
        # upward: the data stage reaching into scoring
        ("pyact_torch.data.inspection", "from ..scoring.video import make_video", "not a layer below"),
        # sideways: detection and scoring are one layer, neither may import the other
        ("pyact_torch.detection.detect", "from ..scoring import metrics", "not a layer below"),
        # inside a function and absolute
        ("pyact_torch.io.storage", "def f():\n    import pyact_torch.training.train", "not a layer below"),
        ("pyact_torch.training.train", "import torch_xla.core.xla_model as xm", "only pyact_torch.training.xla may"),
        (
            "pyact_torch.training.devices",
            "from torch.distributed import init_process_group",
            "only pyact_torch.training.distributed may",
        ),
    ],
)
def test_the_check_sees_a_wrong_import(module, source, expected):
    """Negative controls: each import breaks a rule, and the check says which."""
    found = violations(module, imports(source, module, False))
    assert len(found) == 1 and expected in found[0], found


def test_allowed_imports_pass():
    assert (
        violations(
            "pyact_torch.scoring.evaluate",
            imports(
                "from ..training.validation import evaluate\nfrom . import metrics\nfrom ..io import storage",
                "pyact_torch.scoring.evaluate",
                False,
            ),
        )
        == []
    )
