#!/usr/bin/env python3
"""The shape of the code base, as numbers: the largest class and function, product files
that edit sys.path, `# noqa: E402` lines, the pairs the `duplicates` tool finds, and import
cycles between the project's own modules.

    python3 bench/code_shape.py [--json] [--repo DIR]

Prints a table (and with --json one JSON object). It reads files only; nothing runs.
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

PRODUCT = ("controller", "worker", "dml_app", "dml_tool", "bench")
NOQA_E402 = re.compile(r"#\s*noqa:[^\n]*\bE402")
SYS_PATH_EDIT = re.compile(r"sys\.path(\.insert|\.append|\.extend|\[[^\]]*\]\s*=|\s*=[^=])")


def python_files(repo: Path, folders) -> list[Path]:
    return sorted(p for f in folders for p in (repo / f).rglob("*.py") if "__pycache__" not in p.parts)


def largest(repo: Path) -> dict:
    """The longest class and the longest function (methods included) of the product code."""
    best = {"class": ("", 0), "function": ("", 0)}
    for path in python_files(repo, PRODUCT):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            kind = ("class" if isinstance(node, ast.ClassDef) else
                    "function" if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None)
            if kind:
                n = node.end_lineno - node.lineno + 1
                if n > best[kind][1]:
                    best[kind] = (f"{path.relative_to(repo)}:{node.lineno} {node.name}", n)
    return {k: {"where": w, "lines": n} for k, (w, n) in best.items()}


def module_name(repo: Path, path: Path) -> str:
    rel = path.relative_to(repo).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(repo: Path, path: Path, known: set[str]) -> set[str]:
    """The project's modules that `path` imports, whichever way it names them (a node app's
    `import net` is dml_app.net)."""
    here = module_name(repo, path)
    package = here.rsplit(".", 1)[0] if "." in here else ""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[:-node.level] if path.name != "__init__.py" else \
                    here.split(".")[:len(here.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            for cand in (name, f"{package}.{name}" if package else name):
                if cand in known and cand != here:
                    out.add(cand)
    return out


def import_cycles(repo: Path) -> list[list[str]]:
    files = python_files(repo, PRODUCT)
    known = {module_name(repo, p) for p in files}
    graph = {module_name(repo, p): imports_of(repo, p, known) for p in files}
    # Tarjan's strongly connected components
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def duplicate_pairs(repo: Path) -> int | None:
    tool = shutil.which("duplicates")
    if not tool:
        return None
    text = subprocess.run([tool, "--repo", str(repo), "--seconds", "120"], capture_output=True,
                          text=True, timeout=300).stdout
    m = re.search(r"(\d+) pairs?", text)
    return int(m.group(1)) if m else (0 if "no duplicates" in text else None)


def measure(repo: Path) -> dict:
    product = python_files(repo, PRODUCT)
    every = python_files(repo, PRODUCT + ("tests",))
    return {
        "largest": largest(repo),
        "sys_path_editing_product_files": sorted(
            str(p.relative_to(repo)) for p in product if SYS_PATH_EDIT.search(p.read_text())),
        "noqa_e402": sum(len(NOQA_E402.findall(p.read_text())) for p in every if p.name != "code_shape.py"),
        "duplicate_pairs": duplicate_pairs(repo),
        "import_cycles": import_cycles(repo),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="also print the figures as one JSON object")
    ap.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]), help="the checkout to read")
    a = ap.parse_args(argv)
    m = measure(Path(a.repo).resolve())
    rows = [("largest class", f"{m['largest']['class']['lines']} lines ({m['largest']['class']['where']})"),
            ("largest function", f"{m['largest']['function']['lines']} lines ({m['largest']['function']['where']})"),
            ("product files editing sys.path", str(len(m["sys_path_editing_product_files"]))),
            ("# noqa: E402", str(m["noqa_e402"])),
            ("duplicates pairs", str(m["duplicate_pairs"])),
            ("import cycles", f"{len(m['import_cycles'])} " + "; ".join(" <-> ".join(c) for c in m["import_cycles"]))]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if a.json:
        print(json.dumps(m))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
