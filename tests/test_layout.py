"""The package's floor plan, read from its imports (ast only, nothing is imported).

- ``attn_model`` and ``diffusion_model`` are tensors in, tensors out: no Lightning, no file
  formats (AnnData, HDF5, pandas), no CLI, no training, workflows or evaluation.
- ``data`` knows no model: no network, diffusion, training or workflows.
- ``evaluation`` takes arrays: no torch, no model, no training, no workflows.
- every folder is imported by the ones above it, never the reverse.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "alphastomics"

_LIGHTNING = ("pytorch_lightning", "lightning", "lightning_fabric")
_FILE_FORMATS = ("anndata", "h5py", "pandas")
_CLI = ("argparse", "alphastomics.main", "alphastomics.workflows")
_DISPLAY = ("tqdm",)  # progress bars belong to the callers (training, workflows)
_MODEL = (
    "alphastomics.attn_model",
    "alphastomics.diffusion_model",
    "alphastomics.training",
    "alphastomics.model",
)

RULES: dict[str, tuple[str, ...]] = {
    "attn_model": (
        *_LIGHTNING,
        *_FILE_FORMATS,
        *_CLI,
        *_DISPLAY,
        "alphastomics.training",
        "alphastomics.evaluation",
        "alphastomics.diffusion_model",
        "alphastomics.data.anndata",
        "alphastomics.data.store",
        "alphastomics.data.preprocess",
    ),
    "diffusion_model": (
        *_LIGHTNING,
        *_FILE_FORMATS,
        *_CLI,
        *_DISPLAY,
        "alphastomics.training",
        "alphastomics.evaluation",
        "alphastomics.data.anndata",
        "alphastomics.data.store",
        "alphastomics.data.preprocess",
    ),
    "data": (*_LIGHTNING, *_CLI, *_MODEL, "alphastomics.evaluation"),
    "evaluation": ("torch", *_LIGHTNING, *_CLI, *_MODEL),
    "training": (*_CLI,),
    "utils": (*_CLI, *_MODEL, "alphastomics.evaluation"),
}


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (lazy imports inside functions count)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from alphastomics import keys` imports the module alphastomics.keys
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _forbidden(name: str, banned: tuple[str, ...]) -> bool:
    return any(name == b or name.startswith(f"{b}.") for b in banned)


@pytest.mark.parametrize("folder", sorted(RULES))
def test_folder_imports_follow_the_rules(folder: str) -> None:
    broken = [
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in sorted((PACKAGE / folder).rglob("*.py"))
        for name in sorted(_imports(path))
        if _forbidden(name, RULES[folder])
    ]
    assert not broken, "\n".join(broken)


def test_every_folder_has_a_rule() -> None:
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert folders - set(RULES) <= {"workflows"}  # workflows may use everything


def test_tests_mirror_the_package() -> None:
    tests = Path(__file__).parent
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    mirrored = {p.name for p in tests.iterdir() if p.is_dir() and any(p.glob("test_*.py"))}
    assert folders - {"utils"} <= mirrored
