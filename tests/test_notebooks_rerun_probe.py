"""Rerunning a cell in JupyterLab after later ones (change a parameter, re-measure, re-plot) must not mislead.

Static checks over the solution notebooks' cell sources (the student twins share every cell these look at):
- no cell reads a name that two other cells set: rerunning the earlier setter after the later one hands the
  reader the wrong object (chapter 00's check cells checked the library's `matmul_flops`/`copy_bytes`, imported
  later under the same names, so a wrong or unwritten answer passed; chapter 02's matmul plot and roofline both
  set `points`, so the roofline plot raised after the matmul plot was rerun; chapter 03's data cell set `model`,
  so rerunning it put an untrained model where the base model is saved);
- a collection that several cells add to is made, empty, by a cell that adds nothing (chapter 01's validation
  losses were made by the smoothing cell: rerunning it dropped every later model from the table and the ledger);
- chapter 04's savings take the MoE run from the cell that trains it (rerunning that cell with another γ
  labelled the old run's figures with the new γ), and chapter 03's from the ladder, not the table that shows it.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from minillm.notebooks import load

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = sorted((ROOT / "solutions").glob("0[0-4]_*.ipynb"))
MUTATORS = {"append", "extend", "insert", "update", "setdefault"}
# (notebook, reader, name): read from several setters on purpose, with the reason.
ALLOWED = {
    # section 1 builds the dense GPT untrained, section 4 trains the same architecture: the verdict reads only
    # its parameter count, which both have
    ("04_mixture_of_experts", "verdict", "dense_model"),
}


def source(cell) -> str:
    return cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])


def code_cells(path: Path) -> list[dict]:
    return [c for c in load(path)["cells"] if c["cell_type"] == "code"]


def parse(code: str) -> ast.Module:
    return ast.parse("\n".join(line for line in code.splitlines() if not line.lstrip().startswith(("%", "!"))))


def top_level_names(code: str) -> dict[str, bool]:
    """Names a cell sets at the top level -> True when only imports set them (a module is the same object)."""
    names: dict[str, bool] = {}
    for node in parse(code).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = False
            continue
        for inner in ast.walk(node):
            if isinstance(inner, ast.Name) and isinstance(inner.ctx, ast.Store):
                names[inner.id] = False
            elif isinstance(inner, ast.Import):
                for alias in inner.names:
                    key = (alias.asname or alias.name).split(".")[0]
                    names[key] = names.get(key, True)
            elif isinstance(inner, ast.ImportFrom):
                for alias in inner.names:
                    names[alias.asname or alias.name] = False
    return names


def bound_anywhere(code: str) -> set[str]:
    """Every name the cell binds, in functions and comprehensions too (their reads are then local)."""
    tree = parse(code)
    bound = set(top_level_names(code))
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return bound


def reads(code: str) -> set[str]:
    return {n.id for n in ast.walk(parse(code)) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} \
        - bound_anywhere(code)


def names_read_from_several_setters(path: Path) -> list[tuple[str, str, list[str]]]:
    cells = code_cells(path)
    set_by: dict[str, list[str]] = {}
    import_only: dict[str, bool] = {}
    for cell in cells:
        for name, only_import in top_level_names(source(cell)).items():
            set_by.setdefault(name, []).append(cell["id"])
            import_only[name] = import_only.get(name, True) and only_import
    found = []
    for cell in cells:
        for name in sorted(reads(source(cell))):
            setters = set_by.get(name, [])
            if len(setters) > 1 and not import_only[name] and (path.stem, cell["id"], name) not in ALLOWED:
                found.append((cell["id"], name, setters))
    return found


def is_container(value) -> bool:
    return isinstance(value, (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)) or (
        isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id in ("dict", "list", "set"))


def collections_reset_by_an_adding_cell(path: Path) -> list[tuple[str, list[str], list[str]]]:
    """Names that cells other than their maker add items to, made by a cell that is not just `name = {}`/`[]`."""
    cells = code_cells(path)
    made_by: dict[str, list[tuple[str, ast.AST | None]]] = {}
    added_by: dict[str, set[str]] = {}
    for cell in cells:
        tree = parse(source(cell))
        for node in tree.body:
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        made_by.setdefault(target.id, []).append((cell["id"], node.value))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AugAssign)):
                for target in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                    if isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name):
                        added_by.setdefault(target.value.id, set()).add(cell["id"])
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr in MUTATORS and isinstance(node.func.value, ast.Name)):
                added_by.setdefault(node.func.value.id, set()).add(cell["id"])
    found = []
    for name, adders in added_by.items():
        makers = made_by.get(name, [])
        if not makers or adders <= {cell_id for cell_id, _ in makers}:
            continue   # made and filled in one cell: rerunning it rebuilds the whole thing
        if not any(is_container(value) for _, value in makers):
            continue   # not a list, dict or set made here (a Ledger appends to its file)
        for cell_id, value in makers:
            empty = (isinstance(value, (ast.Dict, ast.List, ast.Set)) and not getattr(value, "keys", None)
                     and not getattr(value, "elts", None)) or \
                    (isinstance(value, ast.Call) and isinstance(value.func, ast.Name)
                     and value.func.id in ("dict", "list", "set") and not value.args and not value.keywords)
            if not empty or cell_id in adders:
                found.append((name, [c for c, _ in makers], sorted(adders)))
    return found


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.stem)
def test_no_cell_reads_a_name_that_two_other_cells_set(path):
    found = names_read_from_several_setters(path)
    assert not found, (f"{path.name}: rerunning the earlier setter after the later one changes what these cells "
                       f"read (cell, name, setters): {found}; give one of them its own name")


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.stem)
def test_collections_later_cells_add_to_are_made_empty_by_a_cell_that_adds_nothing(path):
    found = collections_reset_by_an_adding_cell(path)
    assert not found, (f"{path.name}: rerunning the cell that makes these drops what later cells added "
                       f"(name, made by, added to by): {found}")


def test_chapter_04_savings_take_the_moe_run_from_the_cell_that_trains_it():
    cells = {c["id"]: source(c) for c in code_cells(ROOT / "solutions" / "04_mixture_of_experts.ipynb")}
    setters = {name: [cid for cid, code in cells.items() if name in top_level_names(code)]
               for name in ("moe_run", "runs", "gamma")}
    assert setters["moe_run"] == setters["runs"] == setters["gamma"] == ["collapse"], setters
    from_verdict = reads(cells["savings"]) & set(top_level_names(cells["verdict"]))
    assert not from_verdict, f"the savings read {from_verdict} from the verdict cell, which a rerun can leave stale"


def test_chapter_03_savings_take_the_ladder_rows_from_the_ladder_not_its_table():
    # before: the savings read `measured` and `baseline_row` from the table cell, so rerunning the ladder and
    # skipping its table paired the old run's rows with the new run's target
    cells = {c["id"]: source(c) for c in code_cells(ROOT / "solutions" / "03_pretraining.ipynb")}
    from_table = reads(cells["savings"]) & set(top_level_names(cells["ladder-table"]))
    assert not from_table, f"the savings read {from_table} from the table cell, which a rerun can leave stale"
    assert {"ladder", "target"} <= reads(cells["savings"])
