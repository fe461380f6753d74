"""Run every chapter as a learner on Colab would: live kernel, installed wheel, Colab's packages.

Called by ``make colab`` with the Python of a virtual environment that holds Colab's versions
of numpy, matplotlib, ipywidgets and tqdm (``tests/colab/preinstalled.txt``) and the course
package installed from its wheel. Checks that

- installing the wheel changed none of the preinstalled packages (``--before`` / ``--after``:
  ``pip freeze`` before and after the install);
- ``attn_course`` is imported from site-packages, not from the repository's ``src``;
- every chapter runs top to bottom in a fresh kernel, in a working directory outside the
  repository, without ``ATTN_COURSE_STATIC`` (so interactive figures are live ipywidgets),
  with no error, and every ``explore(...)`` cell shows a live widget.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path


def _freeze(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        for sep in ("==", " @ "):   # "name==version" or "name @ file:///...whl" for a local wheel
            if sep in line:
                name, version = line.split(sep, 1)
                pins[name.strip().lower().replace("_", "-")] = version.strip()
                break
    return pins


def check_unchanged(before: Path, after: Path) -> None:
    old, new = _freeze(before), _freeze(after)
    changed = {n: (v, new.get(n)) for n, v in old.items() if new.get(n) != v}
    if changed:
        raise SystemExit(f"installing the course package changed preinstalled packages: {changed}")
    added = sorted(set(new) - set(old))
    if added != ["attn-course"]:
        raise SystemExit(f"installing the course package added more than itself: {added}")
    print(f"pip freeze: {len(old)} preinstalled packages unchanged; added {added}")


def run_chapter(path: Path, workdir: Path) -> float:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir)}})
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    live = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                raise SystemExit(f"{path.name}: {out['ename']}: {out['evalue']}")
        if re.search(r"^explore\(", cell.source, re.MULTILINE):
            kinds = [k for o in cell.get("outputs", []) for k in o.get("data", {})]
            if "application/vnd.jupyter.widget-view+json" not in kinds:
                raise SystemExit(f"{path.name}: an explore(...) cell did not show a live widget ({kinds})")
            live += 1
    if live == 0:
        raise SystemExit(f"{path.name}: no live interactive figure was shown")
    print(f"{path.name}: ran in {elapsed:.1f} s, {live} live widget(s)", flush=True)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, required=True)
    parser.add_argument("--repo", type=Path, required=True)
    parser.add_argument("notebooks", nargs="*", type=Path)
    args = parser.parse_args()
    check_unchanged(args.before, args.after)
    os.environ.pop("ATTN_COURSE_STATIC", None)
    os.environ.pop("PYTHONPATH", None)
    import ipywidgets

    import attn_course

    where = Path(attn_course.__file__).resolve()
    if (args.repo / "src").resolve() in where.parents or "site-packages" not in where.parts:
        raise SystemExit(f"attn_course was imported from the repository ({where}), not from the wheel")
    print(f"attn_course from {where.parent}; ipywidgets {ipywidgets.__version__}")
    notebooks = args.notebooks or sorted((args.repo / "chapters").glob("[0-9][0-9]_*.ipynb"))
    with tempfile.TemporaryDirectory(prefix="colab-content-") as tmp:
        total = sum(run_chapter(nb.resolve(), Path(tmp)) for nb in notebooks)
    print(f"{len(notebooks)} chapters ran live in {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
