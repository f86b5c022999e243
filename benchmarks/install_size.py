"""Disk taken by a virtual environment, by installed distribution: what `pip install` costs.

    python benchmarks/install_size.py [VENV ...]     # default: the running interpreter's venv
    python benchmarks/install_size.py --closure pixfind VENV   # only what installing pixfind pulls in

Each distribution's size is the sum of the files its RECORD lists (what `pip uninstall` would
remove); "torch stack" adds up torch, torchvision, triton and the nvidia-*/cuda-* libraries that
the CUDA build of torch pulls in. The total is `du` of the whole venv (the interpreter links,
compiled bytecode included). ``--closure NAME`` counts only NAME and what it requires,
transitively (extras left out, markers evaluated here): what ``pip install NAME`` alone would put
in a fresh venv, measured in a venv that also holds test tools. Figures for the README's
install section.
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import Distribution, distributions
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

TORCH_STACK = ("torch", "torchvision", "triton")


def site_packages(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python3*/site-packages"))
    if not found:
        raise SystemExit(f"{venv}: no lib/python3*/site-packages (not a virtual environment?)")
    return found[0]


def installed(venv: Path) -> dict[str, Distribution]:
    return {canonicalize_name(d.metadata["Name"] or "?"): d for d in distributions(path=[str(site_packages(venv))])}


def size_of(dist: Distribution) -> int:
    """Bytes of the files a distribution's RECORD lists."""
    total = 0
    for file in dist.files or []:
        path = Path(str(dist.locate_file(file)))
        if path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    return total


def closure(found: dict[str, Distribution], root: str) -> set[str]:
    """``root`` and everything it requires, transitively, among the installed distributions
    (following the extras a requirement asks for, e.g. ``cuda-toolkit[cublas,cufft]``)."""
    seen: set[tuple[str, str]] = set()
    todo = [(canonicalize_name(root), "")]
    while todo:
        name, extra = todo.pop()
        if (name, extra) in seen or name not in found:
            continue
        seen.add((name, extra))
        for line in found[name].requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": extra}):
                target = canonicalize_name(requirement.name)
                todo += [(target, "")] + [(target, wanted) for wanted in requirement.extras]
    return {name for name, _ in seen}


def in_torch_stack(name: str) -> bool:
    return name in TORCH_STACK or name.startswith(("nvidia-", "cuda-"))


def du(path: Path) -> int:
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def mib(count: int) -> str:
    return f"{count / 2**20:,.0f} MiB"


def report(venv: Path, root: str | None = None, top: int = 15) -> None:
    found = installed(venv)
    names = closure(found, root) if root else set(found)
    per = {name: size_of(found[name]) for name in names}
    total = sum(per.values()) if root else du(venv)
    stack = sum(size for name, size in per.items() if in_torch_stack(name))
    what = f"{root} and its requirements" if root else "in all (du)"
    print(f"{venv}: {mib(total)} {what}, {len(per)} distributions")
    print(f"  torch stack (torch, torchvision, triton, nvidia-*, cuda-*): {mib(stack)}")
    print(f"  everything else: {mib(total - stack)}")
    for name, size in sorted(per.items(), key=lambda item: -item[1])[:top]:
        print(f"  {mib(size):>10}  {name}")


def main() -> None:
    args = sys.argv[1:]
    root = None
    if args[:1] == ["--closure"]:
        root, args = args[1], args[2:]
    for venv in [Path(arg) for arg in args] or [Path(sys.prefix)]:
        report(venv, root)


if __name__ == "__main__":
    main()
