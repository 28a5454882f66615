"""The image's pip requirements: pyproject.toml's dependencies and those of its trainer and tracking extras,
one a line.

    python3 images/requirements.py pyproject.toml > requirements.txt

images/build.sh puts the list into the build context, so that the image's dependency layer is rebuilt only
when these lists change (not the sources, the README or the test extra). Standard library only.
"""

from __future__ import annotations

import sys
import tomllib


def requirements(path: str, extras: tuple[str, ...] = ("trainer", "tracking")) -> list[str]:
    with open(path, "rb") as f:
        project = tomllib.load(f)["project"]
    return [*project["dependencies"], *(r for e in extras for r in project["optional-dependencies"][e])]


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1])))
