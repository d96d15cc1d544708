#!/usr/bin/env bash
# Type-check the engine (ttt/), the checkpoint code (checkpoints/) and the API models (api/) with mypy.
#
# mypy finds a module by its folder's name and knows nothing of pyproject's [tool.setuptools.package-dir]
# (ttt/ is pgttt.ttt), nor of the editable install's import hook. So this lays the installed package out
# as one symlink per checkout file (pgttt/ttt/data.py -> ttt/data.py), runs mypy over it, and rewrites the
# paths mypy reports back to the checkout's (ttt/data.py:12: error: ...). The layout lies at a fixed path
# inside mypy's cache, because a warm run replays a module's errors with the path they were found at.
# Options: [tool.mypy] in pyproject.toml. Exits with mypy's status; extra arguments go to mypy.
set -euo pipefail
cd "$(dirname "$0")/.."
layout=.mypy_cache/pgttt-layout
rm -rf "$layout"
trap 'rm -rf "$layout"' EXIT
# Makes the layout from package-dir and prints one sed expression per package: .../pgttt/ttt/ -> ttt/.
rewrite=$(.venv/bin/python - "$layout" <<'PY'
import pathlib, sys, tomllib

layout, here = pathlib.Path(sys.argv[1]), pathlib.Path.cwd()
package_dir = tomllib.loads((here / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
# Deepest package first, so that pgttt/app/routes/ is rewritten before pgttt/app/ would claim it.
for package, folder in sorted(package_dir.items(), key=lambda item: -item[0].count(".")):
    target = layout.joinpath(*package.split("."))
    target.mkdir(parents=True, exist_ok=True)
    for source in sorted((here / folder).glob("*.py")):
        (target / source.name).symlink_to(source)
    print(f"s|^{target}/|{folder}/|")
PY
)
# pipefail: the script fails with mypy's status, not sed's.
MYPYPATH="$layout" .venv/bin/mypy -p pgttt.ttt -p pgttt.checkpoints -p pgttt.api "$@" 2>&1 | sed -e "$rewrite"
