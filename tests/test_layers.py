"""The package's layers: every `bat.X` import (function-level ones included) goes to the same or a lower
layer, and nothing in bat/ imports a script. A new module gets a row in LAYERS."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LAYERS = {
    # 0: torch-free base
    "__init__": 0, "audio": 0, "events": 0, "shard_reader": 0, "listing": 0, "tagger": 0, "tag": 0, "onnx_graph": 0,
    "demo": 0, "audioset": 0, "cpu": 0, "parity": 0, "cli": 0,
    # 1: training helpers
    "optim": 1, "distributed": 1, "run_control": 1, "files": 1, "precision": 1, "plots": 1,
    # 2: nn and the torch side of data
    "frontend": 2, "model": 2, "beats": 2, "heads": 2, "losses": 2, "windows": 2, "augment": 2, "masking": 2,
    "sampler": 2, "data": 2, "pretraining": 2, "online_probe": 2,
    # 3: store (checkpoint formats, probe files)
    "checkpoint": 3, "probes": 3, "pretrain_state": 3,
    # 4: tasks
    "tasks": 4, "metrics": 4, "features": 4, "finetuning": 4, "sed": 4, "asr": 4, "baseline": 4,
    "selection": 4, "probe_data": 4, "probe_outputs": 4, "probe_state": 4,
    # 5: adapters and tools
    "hear": 5, "xares": 5, "shards": 5, "exporting": 5,
}
SCRIPTS = {p.stem for p in ROOT.glob("*.py")}


def imports(path):
    """(line, imported module) of every import in a file, at any depth."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "bat":  # from bat import demo -> bat.demo
                yield from ((node.lineno, f"bat.{a.name}") for a in node.names)
            else:
                yield node.lineno, node.module


def test_every_module_has_a_layer():
    modules = {p.stem for p in (ROOT / "bat").glob("*.py")}
    assert sorted(modules - set(LAYERS)) == [], "new modules: give them a layer"


def test_imports_go_down_and_never_to_a_script():
    wrong = []
    for path in sorted((ROOT / "bat").glob("*.py")):
        here = LAYERS[path.stem]
        for line, name in imports(path):
            top, _, rest = name.partition(".")
            where = f"bat/{path.name}:{line} imports {name}"
            if top in SCRIPTS:
                wrong.append(f"{where}, a script")
            elif top == "bat" and rest:
                there = LAYERS.get(rest.split(".")[0], here)  # not a module (a name of __init__)
                if there > here:
                    wrong.append(f"{where}: layer {here} -> {there}")
    assert wrong == []


def test_the_base_layer_never_imports_torch_at_module_level():
    """`python -m bat.tag` and the shard tools run without torch: layer 0 imports it inside functions only."""
    wrong = []
    for name in sorted(m for m, layer in LAYERS.items() if layer == 0):
        path = ROOT / "bat" / f"{name}.py"
        if not path.exists():
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            wrong += [f"bat/{name}.py:{node.lineno} imports {n}" for n in names if n.split(".")[0] == "torch"]
    assert wrong == []


def test_the_docs_map_of_the_package_names_every_module_at_its_layer():
    """docs/scripts.md tells a reader copying a script which module holds what, layer by layer."""
    doc = (ROOT / "docs" / "scripts.md").read_text(encoding="utf-8").split("## Where the code lives")[1]
    rows = [ln.split("|") for ln in doc.splitlines() if ln.startswith("| ") and ln[2].isdigit()]
    named = {m: int(cells[1].split(",")[0]) for cells in rows for m in re.findall(r"`(\w+)`", cells[2])}
    assert {m: named.get(m) for m in LAYERS if m != "__init__"} == {m: n for m, n in LAYERS.items() if m != "__init__"}
