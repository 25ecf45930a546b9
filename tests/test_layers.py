"""The package's layers run one way (docs/design.md, "Layers").

Every import of the package's own modules is read from the source, those inside functions
and under `TYPE_CHECKING` included, and each must point to the importer's own layer or one
below it. Siblings in one layer (scheduling/ and mqtt/) never import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "scheduler_publisher"
NAME = "scheduler_publisher"

# Bottom to top. A layer is a tuple of parts; a part is a subpackage or a root module.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("logs",),
    ("config",),
    ("mailbox", "clock", "statestore", "watcher", "endpoints"),  # the root's shared leaves
    ("settings", "stats"),
    ("scheduling", "mqtt"),
    ("ops",),
    ("reloads",),
    ("service",),
    ("cli",),
    ("__init__", "__main__"),
)
MAX_ROOT_MODULES = 12


def part_of(module: str) -> str:
    """`scheduler_publisher.mqtt.netloop` -> `mqtt`; `scheduler_publisher` -> `__init__`."""
    names = module.split(".")
    return names[1] if len(names) > 1 else "__init__"


def layer_of(part: str) -> int:
    for index, parts in enumerate(LAYERS):
        if part in parts:
            return index
    raise AssertionError(f"{part!r} is in no layer of tests/test_layers.py")


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    names = list(relative.parts)
    if names[-1] == "__init__" and len(names) > 1:
        names.pop()
    return ".".join(names)


def imported_modules(path: Path) -> set[str]:
    """The package's own modules `path` imports, wherever in the file the import is."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith(NAME))
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; the package imports absolutely"
            if node.module is None or not node.module.startswith(NAME):
                continue
            found.add(node.module)
            if node.module == NAME:  # `from scheduler_publisher import x`: x may be a module
                found.update(
                    f"{NAME}.{alias.name}"
                    for alias in node.names
                    if (PACKAGE / f"{alias.name}.py").exists() or (PACKAGE / alias.name).is_dir()
                )
    return found


def own_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def violations(importer: str, imported: set[str]) -> list[str]:
    """What breaks the layers among `importer`'s imports, one line each."""
    source = part_of(importer)
    problems = []
    for target in sorted(imported):
        part = part_of(target)
        if part == source or (target == NAME and source != "__init__"):
            continue  # within a part; or `from scheduler_publisher import __version__`
        if layer_of(part) > layer_of(source):
            problems.append(f"{importer} imports {target}, a layer above it")
        elif layer_of(part) == layer_of(source):
            problems.append(f"{importer} imports {target}, its sibling in one layer")
    return problems


def test_every_import_points_down_the_layers() -> None:
    problems = [
        problem
        for path in own_modules()
        for problem in violations(module_name(path), imported_modules(path))
    ]
    assert problems == []


def test_every_part_of_the_package_is_in_a_layer() -> None:
    parts = {part_of(module_name(path)) for path in own_modules()}
    listed = {part for layer in LAYERS for part in layer}
    assert sorted(parts - listed) == []
    assert sorted(listed - parts) == []


def test_the_package_root_keeps_few_modules() -> None:
    assert len(list(PACKAGE.glob("*.py"))) <= MAX_ROOT_MODULES


@pytest.mark.parametrize(
    ("importer", "imported", "complaint"),
    [
        (
            "scheduler_publisher.config.cron",
            {"scheduler_publisher.scheduling.triggers"},
            "a layer above it",
        ),
        (
            "scheduler_publisher.mqtt.session",
            {"scheduler_publisher.scheduling.plan"},
            "its sibling in one layer",
        ),
        ("scheduler_publisher.logs.setup", {"scheduler_publisher.settings"}, "a layer above it"),
    ],
)
def test_an_import_up_the_layers_or_across_siblings_is_caught(
    importer: str, imported: set[str], complaint: str
) -> None:
    """The check itself: the cycle this layout removed (config → triggers) would be caught."""
    [problem] = violations(importer, imported)
    assert complaint in problem


def test_imports_inside_functions_are_read(tmp_path: Path) -> None:
    source = tmp_path / "late.py"
    source.write_text(
        "def f():\n    from scheduler_publisher.mqtt import netloop\n"
        "    import scheduler_publisher.ops.http\n"
    )
    assert imported_modules(source) == {"scheduler_publisher.mqtt", "scheduler_publisher.ops.http"}
