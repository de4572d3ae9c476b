"""Process start: ``import svcrules.cli`` (all that ``svcrules --help`` needs) loads
neither the compiler's libraries nor the kernel drivers; the commands import them
where they are used. Checked in a fresh interpreter, where sys.modules is clean."""

from __future__ import annotations

import json
import subprocess
import sys

# Each of these costs tens of milliseconds at every start, --help included.
DEFERRED = (
    "pydantic",
    "jinja2",
    "yaml",
    "orjson",
    "nftables",
    "svcrules.compiler",
    "svcrules.kernel.registry",
    "svcrules.kernel.reconcile",
    "svcrules.kernel.nft.transport",
    "hypothesis",
)


def _loaded_after(statement: str) -> list[str]:
    probe = (
        "import json, sys\n"
        f"{statement}\n"
        f"print(json.dumps([m for m in {list(DEFERRED)!r} if m in sys.modules]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    loaded: list[str] = json.loads(out)
    return loaded


def test_cli_import_defers_heavy_modules() -> None:
    assert _loaded_after("import svcrules.cli") == []


def _help(*args: str) -> str:
    return (
        "import contextlib, io\n"
        "from svcrules.cli import app\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        f"    app({list(args)!r})"
    )


def test_help_loads_neither_rich_nor_the_compiler() -> None:
    """svcrules prints its help as plain text (svcrules.cli.help): ``--help`` pays for
    neither Rich (only a progress spinner on a terminal loads it) nor the compiler's
    libraries."""
    assert _loaded_after(_help("--help")) == []
    for args in (["--help"], ["compile", "--help"], ["--version"]):
        probe = _help(*args) + "\nprint(json.dumps([m for m in sys.modules if m == 'rich']))"
        out = subprocess.run(
            [sys.executable, "-c", "import json, sys\n" + probe],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert json.loads(out) == [], args


def test_package_root_is_lazy() -> None:
    assert _loaded_after("import svcrules") == []
    # ... and still offers its public names, loading them on first use.
    loaded = _loaded_after("import svcrules; svcrules.compile")
    assert "svcrules.compiler" in loaded


def test_a_run_that_compiles_nothing_loads_no_compiler_library() -> None:
    """A sync whose inputs did not change only digests them: what it imports to get
    there (the command, the reconciler, the driver, the compiler's Job) leaves
    pydantic, Jinja2, PyYAML and orjson unloaded."""
    loaded = _loaded_after(
        "import svcrules.cli.kernel_commands, svcrules.kernel.reconcile, "
        "svcrules.kernel.nft.driver, svcrules.compiler"
    )
    assert not {"pydantic", "jinja2", "yaml", "orjson"} & set(loaded)


def test_public_names_resolve() -> None:
    import svcrules

    for name in svcrules.__all__:
        assert getattr(svcrules, name) is not None
    assert set(svcrules.__all__) <= set(dir(svcrules))
