"""Tools for course authors (not needed by learners).

``python -m attn_course.authoring stamp``
    writes the Colab install cell, derived from ``repository.url`` in
    ``_config.yml`` (the one place the repository's address lives), into
    every chapter notebook listed in ``_toc.yml``.
``python -m attn_course.authoring execute [NOTEBOOK ...]``
    stamps, then re-executes the notebooks in place, in a fresh kernel each,
    with ``ATTN_COURSE_STATIC=1`` so that interactive figures are stored in
    their static form for the book (``make notebooks``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
INSTALL_TAG = "colab-install"


def _yaml(path: Path):
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8"))


def repository_url(root: Path = ROOT) -> str:
    """``repository.url`` from ``_config.yml``."""
    url = (_yaml(root / "_config.yml").get("repository") or {}).get("url")
    if not url:
        raise ValueError("_config.yml has no repository.url")
    return url.rstrip("/")


def install_cell_source(url: str) -> str:
    """The source of the guarded install cell for a repository URL.

    On Colab it installs the package with pip from the repository; when that fails (a fork, a
    private copy, no network) it prints pip's last lines and stops *Run all* with a message
    saying what to do, instead of a traceback on the next import.
    """
    return (
        "# On Colab, install the course package (this cell is hidden in the book).\n"
        "import sys\n"
        "\n"
        'if "google.colab" in sys.modules:\n'
        "    import subprocess\n"
        "\n"
        f'    COURSE = "attn-course @ git+{url}"\n'
        '    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", COURSE],\n'
        "                         capture_output=True, text=True)\n"
        "    if pip.returncode:\n"
        "        print(pip.stderr[-1500:])\n"
        "        raise SystemExit(\n"
        '            f"Could not install the course package ({COURSE}). If this notebook comes from "\n'
        '            "a fork or a private copy, set COURSE to an address this runtime can reach "\n'
        "            \"(or upload the repository's folder and use 'attn-course @ file:///content/<folder>'), \"\n"
        '            "then run this cell again.")'
    )


def chapter_notebooks(root: Path = ROOT) -> list[Path]:
    """The chapter notebooks that ``_toc.yml`` lists, in book order."""
    found: list[Path] = []

    def walk(node):
        if isinstance(node, dict):
            f = node.get("file")
            if isinstance(f, str) and f.startswith("chapters/"):
                p = root / f
                found.append(p if p.suffix else p.with_suffix(".ipynb"))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(_yaml(root / "_toc.yml"))
    return found


def stamp(path: Path, url: str) -> bool:
    """Put the current install cell into notebook ``path``; return whether it changed."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    source = install_cell_source(url)
    cells = [c for c in nb.cells if INSTALL_TAG in c.get("metadata", {}).get("tags", [])]
    if len(cells) > 1:
        raise ValueError(f"{path}: more than one cell tagged {INSTALL_TAG!r}")
    if cells:
        cell = cells[0]
        if cell.source == source:
            return False
        cell.source = source
    else:
        cell = nbformat.v4.new_code_cell(source)
        first_code = next((i for i, c in enumerate(nb.cells) if c.cell_type == "code"), len(nb.cells))
        nb.cells.insert(first_code, cell)
    cell.metadata["tags"] = sorted({INSTALL_TAG, "remove-cell"} | set(cell.metadata.get("tags", [])))
    cell.outputs, cell.execution_count = [], None
    nbformat.write(nb, path)
    return True


def run_on() -> str:
    """Where notebooks run here, as the course map names it: ``"2 CPU cores"`` or the GPU's name."""
    import torch

    from . import _cpu_cores

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cores = _cpu_cores()
    return f"{cores} CPU core{'s' if cores != 1 else ''}"


def execute(path: Path, timeout: int = 600) -> float:
    """Re-execute notebook ``path`` in place in a fresh kernel; return the seconds it took.

    The notebook's metadata keeps how long the run took, start to end, and on what
    (``metadata["attn_course"] = {"run_seconds": ..., "run_on": ...}``): the intro's course map
    shows it, so a learner knows what *Run all* costs.
    """
    import nbformat
    from nbclient import NotebookClient

    os.environ["ATTN_COURSE_STATIC"] = "1"
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    nb.metadata.pop("widgets", None)
    nb.metadata["attn_course"] = {"run_seconds": round(elapsed, 1), "run_on": run_on()}
    nbformat.write(nb, path)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attn_course.authoring", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["stamp", "execute"])
    parser.add_argument("notebooks", nargs="*", type=Path,
                        help="notebooks to process (default: every chapter in _toc.yml)")
    args = parser.parse_args(argv)
    notebooks = args.notebooks or chapter_notebooks()
    url = repository_url()
    for nb in notebooks:
        changed = stamp(nb, url)
        if args.command == "stamp":
            print(f"{nb}: {'stamped' if changed else 'up to date'}")
        else:
            print(f"{nb}: executing ...", flush=True)
            print(f"{nb}: done in {execute(nb):.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
