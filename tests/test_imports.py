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


def package_imports(path: Path) -> set[str]:
    """nitro_dist modules ``path`` imports anywhere (lazy imports too), except under
    ``if TYPE_CHECKING:`` (annotations only)."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            skip |= {id(n) for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("nitro_dist")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nitro_dist"):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}  # from pkg import module
    return out


def module_graph() -> dict[str, set[str]]:
    files = {
        ".".join(f.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__"): f
        for f in PKG.rglob("*.py")
    }
    return {m: {i for i in package_imports(f) if i in files and i != m} for m, f in files.items()}


def test_nothing_outside_the_digits_task_imports_it():
    """Tasks are plugins (STYLE.md 13): the core finds the digits task by name only."""
    for module, imports in module_graph().items():
        if module.startswith("nitro_dist.digits"):
            continue
        found = [i for i in imports if i.startswith("nitro_dist.digits")]
        assert not found, (module, found)


def test_no_import_cycles():
    graph = module_graph()
    assert len(graph) > 40
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, " -> ".join([*path, m, n])
            if n not in state:
                visit(n, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_inference_and_serving_import_no_training_code():
    """Inference, the image API, serving, export and the checkpoint layout read checkpoints without
    building runs: none of them reaches training code, even lazily."""
    graph = module_graph()
    training = ("nitro_dist.build", "nitro_dist.step", "nitro_dist.loop", "nitro_dist.checkpoint")
    roots = ["nitro_dist.inference", "nitro_dist.image_api", "nitro_dist.serve"]
    roots += ["nitro_dist.remote", "nitro_dist.checkpoint_layout", "nitro_dist.sample"]
    roots += ["nitro_dist.export"]
    for root in roots:
        seen, todo = set(), [root]
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += graph[m]
        bad = sorted(m for m in seen if m in training or m.startswith("nitro_dist.distributed"))
        assert not bad, (root, bad)
