"""The installed project adds one import name, ``dz_lightning``, so a user's own ``callbacks``/``tasks`` never clash."""

import subprocess
import sys
import textwrap
from pathlib import Path


def test_user_project_with_own_callbacks_and_tasks_imports_ours(tmp_path: Path) -> None:
    (tmp_path / "callbacks.py").write_text("MINE = 'user callbacks'\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "__init__.py").write_text("MINE = 'user tasks'\n")
    script = textwrap.dedent(
        """
        import callbacks, tasks
        from dz_lightning.callbacks import ZOGraSP
        from dz_lightning.callbacks.zo_grasp import ZOGraSP as Z2
        from dz_lightning.tasks.classification import ZOClassifier
        assert callbacks.MINE == "user callbacks" and tasks.MINE == "user tasks"
        assert ZOGraSP is Z2 and ZOClassifier.__module__ == "dz_lightning.tasks.classification"
        print("ok")
        """
    )
    # Run from the user's project folder, as a user would: their folder comes first on sys.path.
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_installed_top_level_names_are_only_dz_lightning() -> None:
    from importlib.metadata import distribution

    top = distribution("dz_lightning").read_text("top_level.txt")
    assert top is not None and top.split() == ["dz_lightning"], top


def test_every_package_folder_is_listed_for_installation() -> None:
    """A subpackage missing from ``[tool.setuptools] packages`` works in the checkout but not in a wheel."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    folders = {"dz_lightning": root / "dz_lightning", **{k: root / v for k, v in config["package-dir"].items()}}
    found = set()
    for name, folder in folders.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            found.add(".".join((name, *rel)))
    assert found <= listed, f"not listed in pyproject.toml: {sorted(found - listed)}"


def test_public_names_are_one_list() -> None:
    """``__all__``, the lazy ``_EXPORTS`` table and the ``TYPE_CHECKING`` imports name the same objects, from the same
    modules, and each resolves."""
    import ast

    import dz_lightning

    tree = ast.parse(Path(dz_lightning.__file__).read_text())
    checked = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    imported = {alias.name: node.module for node in checked.body if isinstance(node, ast.ImportFrom)
                for alias in node.names}
    assert imported == dz_lightning._EXPORTS
    assert dz_lightning.__all__ == sorted(dz_lightning._EXPORTS)
    for name, module in dz_lightning._EXPORTS.items():
        assert getattr(dz_lightning, name).__module__ == module  # defined there, not re-exported


def test_every_imported_distribution_is_declared() -> None:
    """Each third-party package the installed code imports is a declared dependency (not only a dependency's)."""
    import ast
    import sys

    import tomllib

    root = Path(__file__).resolve().parents[1]
    declared = {d.split(">")[0].split("=")[0].split("[")[0].strip().replace("-", "_").lower()
                for d in tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]}
    provides = {"lightning": "lightning", "phi": "phiflow", "phiml": "phiml", "sklearn": "scikit_learn",
                "yaml": "pyyaml", "PIL": "pillow", "google": "protobuf"}
    missing = set()
    for folder in ("dz_lightning", "tasks", "callbacks"):
        for path in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
                for name in names:
                    top = name.split(".")[0]
                    if top in sys.stdlib_module_names or top in ("dz_lightning", "tasks", "callbacks", "__future__"):
                        continue
                    if provides.get(top, top).lower() not in declared:
                        missing.add(f"{top} ({path.relative_to(root)})")
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"
