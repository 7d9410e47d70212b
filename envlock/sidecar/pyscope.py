"""Free-name analysis of Python source: which names a piece of code reads but does not bind.

``customcode.capture_main`` uses it to take from a training script only the definitions a
saved model needs, and, transitively, what those definitions use.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator


class _Scope(ast.NodeVisitor):
    """Names a piece of code reads that it does not bind itself (its free names)."""

    def __init__(self) -> None:
        self.loads: set[str] = set()
        self.stores: set[str] = set()
        self.nested_free: set[str] = set()

    def visit_Name(self, node: ast.Name) -> None:
        (self.loads if isinstance(node.ctx, ast.Load) else self.stores).add(node.id)

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        for d in getattr(node, "decorator_list", []):
            self.visit(d)
        args = node.args
        for default in [*args.defaults, *args.kw_defaults]:
            if default is not None:
                self.visit(default)
        for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
            if a is not None and a.annotation is not None:
                self.visit(a.annotation)
        inner = _Scope()
        for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
            if a is not None:
                inner.stores.add(a.arg)
        body = node.body if isinstance(node.body, list) else [node.body]
        for stmt in body:
            inner.visit(stmt)
        self.nested_free |= inner.free()
        if not isinstance(node, ast.Lambda):
            self.stores.add(node.name)

    visit_FunctionDef = _function
    visit_AsyncFunctionDef = _function
    visit_Lambda = _function

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for n in [*node.decorator_list, *node.bases, *(k.value for k in node.keywords)]:
            self.visit(n)
        inner = _Scope()
        for stmt in node.body:
            inner.visit(stmt)
        # Methods do not see class-level names; the class body does.
        self.nested_free |= inner.free()
        self.stores.add(node.name)

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self.stores.add(a.asname or a.name.split(".")[0])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for a in node.names:
            self.stores.add(a.asname or a.name)

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.name:
            self.stores.add(node.name)
        self.generic_visit(node)

    def visit_Global(self, node: ast.Global) -> None:
        self.loads.update(node.names)

    def free(self) -> set[str]:
        return (self.loads | self.nested_free) - self.stores


def free_names(node: ast.AST) -> set[str]:
    scope = _Scope()
    scope.visit(node)
    return scope.free()


def bound_names(node: ast.stmt) -> set[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, ast.Import):
        return {a.asname or a.name.split(".")[0] for a in node.names}
    if isinstance(node, ast.ImportFrom):
        return {a.asname or a.name for a in node.names if a.name != "*"}
    targets: list[ast.expr] = []
    if isinstance(node, ast.Assign):
        targets = list(node.targets)
    elif isinstance(node, ast.AnnAssign) and node.value is not None:
        targets = [node.target]
    names = set()
    for t in targets:
        for n in ast.walk(t):
            if isinstance(n, ast.Name):
                names.add(n.id)
    return names


def definitions(body: Iterable[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements that bind a module-level name, also inside if/try/with blocks (not loops,
    functions or classes): a script often defines things under ``if`` or ``try``."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Import,
                             ast.ImportFrom, ast.Assign, ast.AnnAssign)):
            yield node
        elif isinstance(node, ast.If):
            yield from definitions(node.body)
            yield from definitions(node.orelse)
        elif isinstance(node, ast.Try):
            yield from definitions(node.body)
            yield from definitions(node.orelse)
            yield from definitions(node.finalbody)
        elif isinstance(node, ast.With):
            yield from definitions(node.body)
