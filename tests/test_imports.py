"""models/ and discriminator/ stay pure torch/diffusers (STYLE.md 1)."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "nitro_dist"
FORBIDDEN = ("ray", "deepspeed", "torch.distributed")


def imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def test_models_and_discriminator_import_no_parallelism():
    files = list((PKG / "models").rglob("*.py")) + list((PKG / "discriminator").rglob("*.py"))
    assert len(files) >= 6
    for f in files:
        for name in imported_modules(f):
            assert not any(name == b or name.startswith(b + ".") for b in FORBIDDEN), (f, name)
