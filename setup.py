"""Packaging beside pyproject.toml: only what pyproject cannot say.

The shipped recipes and spaces stay in the top-level ``recipes/`` and ``spaces/`` folders of the repository; the
build maps them into the wheel as ``nvae_search/_builtin/{recipes,spaces}`` (``nvae_search.builtins`` finds them
in both places). Mapped folders cannot be discovered, hence the list here next to the discovered packages; their
sub-folders (``recipes/cpu`` …) are listed too, as setuptools otherwise warns that it ships data-only packages.
"""

from pathlib import Path

from setuptools import find_packages, setup

BUILTIN_DIRS = {"nvae_search._builtin.recipes": "recipes", "nvae_search._builtin.spaces": "spaces"}


def builtin_packages() -> list[str]:
    found = []
    for package, folder in BUILTIN_DIRS.items():
        found.append(package)
        found += [f"{package}.{sub.name}" for sub in sorted(Path(folder).iterdir()) if sub.is_dir()]
    return found


setup(packages=find_packages(include=["nvae_search*"]) + builtin_packages(), package_dir=BUILTIN_DIRS)
