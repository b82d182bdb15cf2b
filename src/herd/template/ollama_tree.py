"""Walks over a parsed Go template tree, as Ollama does: the identifiers a template uses
(Ollama's Identifiers), the tree cut after `.Response` (deleteNode), and a visit of every
node with its ancestors (templateVisit)."""

from __future__ import annotations

from collections.abc import Callable

from herd.template.gotemplate.nodes import (
    ActionNode,
    BranchNode,
    CommandNode,
    FieldNode,
    ListNode,
    Node,
    PipeNode,
    TemplateNode,
    VariableNode,
)

# ---- tree walks (Ollama's Identifiers and deleteNode) -------------------------------------


def identifiers(n: Node) -> list[str]:
    """Field and variable names a node uses (Ollama's template.Identifiers)."""
    if isinstance(n, ListNode):
        return [i for c in n.nodes for i in identifiers(c)]
    if isinstance(n, TemplateNode):
        if n.pipe is None:
            raise ValueError("undefined template specified")
        return identifiers(n.pipe)
    if isinstance(n, ActionNode):
        return identifiers(n.pipe)
    if isinstance(n, BranchNode):
        names = identifiers(n.pipe)
        for lst in (n.list, n.else_list):
            if lst is not None:
                names += identifiers(lst)
        return names
    if isinstance(n, PipeNode):
        return [i for c in n.cmds for a in c.args for i in identifiers(a)]
    if isinstance(n, FieldNode | VariableNode):
        return list(n.ident)
    return []


def cut_after_response(root: ListNode) -> ListNode:
    """A copy of the tree that ends at the first `.Response` field: the last turn of a
    prompt-style template is rendered up to the model's answer (Ollama's deleteNode)."""
    cut = False

    def drop(n: Node) -> bool:
        nonlocal cut
        if isinstance(n, FieldNode) and "Response" in n.ident:
            cut = True
            return False
        return cut

    def walk(n: Node) -> Node | None:
        if drop(n):
            return None
        if isinstance(n, ListNode):
            n.nodes = [c for c in (walk(c) for c in n.nodes) if c is not None]
        elif isinstance(n, BranchNode):
            # Ollama walks only the branch lists, never the condition; a list dropped
            # whole would crash Ollama, here it just empties
            n.list = walk(n.list) or ListNode(n.list.pos)  # type: ignore[assignment]
            if n.else_list is not None:
                n.else_list = walk(n.else_list) or ListNode(n.else_list.pos)  # type: ignore[assignment]
        elif isinstance(n, ActionNode):
            pipe = walk(n.pipe)
            if pipe is None:
                return None
        elif isinstance(n, PipeNode):
            cmds: list[CommandNode] = []
            for c in n.cmds:
                c.args = [a for a in (walk(a) for a in c.args) if a is not None]
                if not c.args:
                    return None
                cmds.append(c)
            if not cmds:
                return None
            n.cmds = cmds
        return n

    tree = root.copy()
    out = walk(tree)
    return out if isinstance(out, ListNode) else ListNode(root.pos)


def walk_nodes(root: Node, visit: Callable[[Node, list[Node]], None]) -> None:
    """Visit every node with its ancestors (like Ollama's templateVisit): lists, branches
    (condition first), actions, template calls, pipelines, commands and their arguments."""
    stack: list[Node] = []

    def go(n: Node | None) -> None:
        if n is None:
            return
        stack.append(n)
        visit(n, stack)
        if isinstance(n, ListNode):
            for c in n.nodes:
                go(c)
        elif isinstance(n, BranchNode):
            go(n.pipe)
            go(n.list)
            go(n.else_list)
        elif isinstance(n, ActionNode | TemplateNode):
            go(n.pipe)
        elif isinstance(n, PipeNode):
            for c in n.cmds:
                go(c)
        elif isinstance(n, CommandNode):
            for a in n.args:
                go(a)
        stack.pop()

    go(root)
