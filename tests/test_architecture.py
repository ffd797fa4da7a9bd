"""The package's shape: every import points down the layers (or within a folder), and no import forms a circle.

The layers, bottom to top, are those of minislm/__init__.py. Imports are read from the source with `ast`
(top-level and inside functions alike), so a hidden import counts as much as a visible one.
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "minislm"
TOOLS = ("cli", "train", "classify", "experiments", "bench", "bench_train", "weights", "embed", "stream", "distributed",
         "resources")
LAYERS = {                       # module prefix -> layer; a module takes the layer of its longest prefix
    "minislm.numba_setup": 0, "minislm.atomic": 0, "minislm.flops": 0, "minislm.data": 0,
    "minislm.kernels": 1,
    "minislm.encoder": 2,
    "minislm.experts": 3,
    "minislm.collab": 4,
    "minislm.team": 5,
    **{f"minislm.{t}": 6 for t in TOOLS},
    "minislm": 7,                # the package's face (__init__) imports what it exports
}


def module_name(path):
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module):
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def folder_of(module):
    """minislm.team.team -> minislm.team; a top-level module is its own folder."""
    parts = module.split(".")
    return ".".join(parts[:2])


def imports_of(path, module):
    """-> set of minislm modules that `path` imports (resolving `from minislm.x import y` to minislm.x.y when
    y is a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("minislm")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("minislm"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                is_module = (PACKAGE.parent / Path(*sub.split("."))).with_suffix(".py").exists() or \
                    (PACKAGE.parent / Path(*sub.split(".")) / "__init__.py").exists()
                out.add(sub if is_module else node.module)
    out.discard(module)
    return out


def graph():
    mods = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: {i for i in imports_of(p, m) if i in mods} for m, p in mods.items()}


def test_no_upward_import():
    upward = []
    for m, deps in graph().items():
        for d in deps:
            if m == "minislm" or folder_of(d) == folder_of(m):
                continue  # the package face, or a neighbour inside the same folder
            if layer_of(d) > layer_of(m):
                upward.append(f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})")
    assert not upward, "imports that point up the layers:\n" + "\n".join(sorted(upward))


def test_no_circle():
    g = graph()
    # a folder's __init__ re-exports its modules: edges into a package face are not a circle's closing edge
    faces = {m for m in g if (PACKAGE.parent / Path(*m.split(".")) / "__init__.py").exists()}
    edges = {m: {d for d in deps if d not in faces} for m, deps in g.items() if m not in faces}
    state, stack, circles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in edges.get(m, ()):
            if state.get(d) == "open":
                circles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_checker_sees_an_upward_import():
    """The graph is real: the team imports the collaboration, the tools import the team."""
    g = graph()
    assert "minislm.collab.model" in g["minislm.team.team"]
    assert "minislm.team.team" in g["minislm.team.training"]
    assert layer_of("minislm.kernels.matmul") < layer_of("minislm.encoder.model") < layer_of("minislm.team.team")


def test_no_machine_path_in_code_or_tests():
    roots = [PACKAGE, PACKAGE.parent / "tests"]
    bad = [f"{p}: {line.strip()}" for r in roots for p in r.rglob("*.py")
           for line in p.read_text(encoding="utf-8").splitlines()
           if any(s in line for s in ("/work/", "/home/", "/root/", "/tmp/")) and "noqa: path" not in line
           and p.name != "test_architecture.py"]
    assert not bad, "absolute paths of one machine:\n" + "\n".join(bad)
