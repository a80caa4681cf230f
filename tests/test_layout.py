"""connector.py reads from the top down: imports in one place, banner
sections in the order the opening comment lists, each opening with a comment,
and every name a definition uses defined before it (mutual recursion aside)."""

import ast
import os
import re

SOURCE = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "connector.py"), encoding="utf-8").read()
LINES = SOURCE.splitlines()
TREE = ast.parse(SOURCE)
BANNER = "# " + "-" * 74


def banners():
    """(line index of the name, name) of each section."""
    return [(i + 1, LINES[i + 1][2:]) for i in range(len(LINES) - 2)
            if LINES[i] == BANNER and LINES[i + 2] == BANNER]


def defined_names(node):
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return [node.name]
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]


def used_names(node):
    used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
    for n in ast.walk(node):  # a quoted annotation names what it uses too
        annotation = n.annotation if isinstance(n, (ast.arg, ast.AnnAssign)) else \
            n.returns if isinstance(n, ast.FunctionDef) else None
        for c in ast.walk(annotation) if annotation is not None else ():
            if isinstance(c, ast.Constant) and isinstance(c.value, str):
                used.update(re.findall(r"[A-Za-z_]\w*", c.value))
    return used


def test_the_opening_comment_lists_every_section_in_order():
    doc = " ".join(ast.get_docstring(TREE).split())
    listed = re.search(r"Sections, in dependency order \(each uses only those before it\): (.*?)\.(?: |$)", doc)
    assert [name.strip().lower() for name in listed.group(1).split(",")] == [name.lower() for _, name in banners()]


def test_every_section_opens_with_a_comment_saying_why():
    assert [name for line, name in banners() if not LINES[line + 2].startswith("# ")] == []


def test_imports_are_in_one_place_at_the_top():
    first_section = banners()[0][0]
    assert [n.lineno for n in TREE.body if isinstance(n, (ast.Import, ast.ImportFrom)) and n.lineno > first_section] \
        == []


def test_a_definition_uses_only_what_is_defined_before_it_unless_they_use_each_other():
    nodes = [n for n in TREE.body if defined_names(n) or isinstance(n, (ast.Expr, ast.If))]
    where = {}
    for index, node in enumerate(nodes):
        for name in defined_names(node):
            where.setdefault(name, index)
    uses = [{where[name] for name in used_names(node) if name in where} - {index} for index, node in enumerate(nodes)]

    def reaches(start, goal):
        seen, todo = set(), [start]
        while todo:
            index = todo.pop()
            if index == goal:
                return True
            if index not in seen:
                seen.add(index)
                todo.extend(uses[index])
        return False

    later = ["%s (line %d) uses %s (line %d)" % (defined_names(nodes[i]) or ["statement"], nodes[i].lineno,
                                                 defined_names(nodes[j]), nodes[j].lineno)
             for i in range(len(nodes)) for j in sorted(uses[i]) if j > i and not reaches(j, i)]
    assert later == []
