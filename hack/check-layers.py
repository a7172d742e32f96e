#!/usr/bin/env python3
"""Checks that each crate's modules depend one way only: no upward import, no import circle.

Each crate below lists its top-level modules (folders or files under src/; `folder::sub`
places one submodule apart from its folder) from the bottom layer up. A module may use only modules listed before it (an upward or sideways `crate::`
path fails). Inside a folder, the submodules' imports (`crate::a::b`, `super::b`) must form
no circle either. Test modules (`#[cfg(test)] mod tests`) are left out: a test may use
anything. Run from anywhere: `python3 hack/check-layers.py`; exits 1 on a violation.
"""

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Bottom first. A module not listed here is an error (new modules get a place in the order).
LAYERS = {
    "artifact": ["source", "oci", "signature", "index", "view", "startup", "format", "discover", "build"],
    # A folder may be split where its parts sit at different layers: `layerfs::tree` is pure
    # data the fetch jobs build ahead; the FUSE server above reads through `content`.
    "node": ["error", "holder", "metrics", "snapshot", "layerfs::tree", "content", "layerfs", "remote", "cri"],
    "controller": ["metrics", "selector", "clients", "resolve", "builder", "context", "learn", "policy", "image", "server", "crdgen"],
}

# Files that only wire the crate together (they may use every module).
WIRING = {"lib.rs", "main.rs"}

PATH_RE = re.compile(r"\b(crate|super)((?:::[a-z_][a-z0-9_]*)+)")
TEST_RE = re.compile(r"^#\[cfg\(test\)\]\s*\n\s*(pub\s+)?mod\s+\w+\s*\{", re.M)


def module_path(src: pathlib.Path, f: pathlib.Path) -> list[str]:
    parts = list(f.relative_to(src).with_suffix("").parts)
    if parts[-1] == "mod":
        parts.pop()
    return parts


def strip_tests(text: str) -> str:
    m = TEST_RE.search(text)
    text = text[: m.start()] if m else text
    # Comments and doc links name modules without depending on them.
    return re.sub(r"//.*", "", text)


def targets(mod: list[str], text: str):
    """The module paths (as lists) that `text`, the body of module `mod`, refers to."""
    for m in PATH_RE.finditer(text):
        kind, rest = m.group(1), m.group(2).split("::")[1:]
        if kind == "crate":
            yield rest
        else:
            # `super::` inside a file is relative to the file's module: its parent.
            base = mod[:-1]
            while rest and rest[0] == "super":
                base, rest = base[:-1], rest[1:]
            yield base + rest


def sccs(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
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

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def submodule(src: pathlib.Path, t: list[str]) -> str:
    """The graph node of a path inside a folder: `folder::sub` when it names a submodule."""
    if len(t) > 1 and ((src / t[0] / f"{t[1]}.rs").exists() or (src / t[0] / t[1] / "mod.rs").exists()):
        return f"{t[0]}::{t[1]}"
    return t[0]


def layer_of(order: list[str], path: list[str]) -> str | None:
    """The entry of `order` that `path` falls under (the longest matching prefix)."""
    best = None
    for key in order:
        k = key.split("::")
        if path[: len(k)] == k and (best is None or len(k) > len(best.split("::"))):
            best = key
    return best


def check(crate: str, order: list[str]) -> list[str]:
    src = ROOT / crate / "src"
    rank = {m: i for i, m in enumerate(order)}
    errors, graph = [], {}
    for f in sorted(src.rglob("*.rs")):
        rel = f.relative_to(src)
        if rel.parts[0] == "bin" or (len(rel.parts) == 1 and rel.name in WIRING):
            continue
        mod = module_path(src, f)
        top = layer_of(order, mod)
        if top is None:
            errors.append(f"{crate}/src/{rel}: module `{mod[0]}` has no place in LAYERS[{crate!r}]")
            continue
        text = strip_tests(f.read_text())
        node = "::".join(mod[:2])
        for t in targets(mod, text):
            if not t:
                continue
            dst_layer = layer_of(order, t)
            if dst_layer is None:
                continue  # an item of the crate root (lib.rs), e.g. a re-export or `Error`
            if dst_layer != top and rank[dst_layer] > rank[top]:
                errors.append(
                    f"{crate}/src/{rel}: `{top}` (layer {rank[top]}) uses `{'::'.join(t)}` "
                    f"(layer {rank[dst_layer]}): an upward import"
                )
            if t[0] == mod[0]:
                # Only paths naming a submodule count (`oci::registry::X`); `oci::Descriptor`
                # names the folder's own items.
                dst = submodule(src, t)
                if dst != node:
                    graph.setdefault(node, set()).add(dst)
    for comp in sccs(graph):
        errors.append(f"{crate}: import circle between {', '.join(comp)}")
    return errors


def main() -> int:
    errors = []
    for crate, order in LAYERS.items():
        errors += check(crate, order)
    for e in errors:
        print(e)
    if errors:
        print(f"check-layers: {len(errors)} violation(s)")
        return 1
    print("check-layers: ok (" + "; ".join(f"{c}: {' < '.join(o)}" for c, o in LAYERS.items()) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
