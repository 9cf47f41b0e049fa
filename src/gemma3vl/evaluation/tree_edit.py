"""Tree edit distance (Zhang & Shasha, 1989) and the receipt metrics built on it (Donut, Kim et al. 2022).

A parsed document (CORD's ``gt_parse``) is a JSON tree. Donut scores a prediction two ways, and so do we:

* **TED accuracy**: ``max(0, 1 - TED(pred, gt) / TED(empty, gt))`` over the trees of the normalised JSON;
* **field F1**: precision / recall over the flattened ``(key path, value)`` pairs, matched as multisets.

Normalisation (Donut's ``JSONParseEvaluator.normalize_dict``): keys sorted by ``(length, name)``; every value
becomes a list (a lone object or string is a list of one); list items that are objects are normalised
recursively; scalars become stripped strings as Python writes them (``str``: ``true`` is ``True``, ``2.50`` is
``2.5``); empty objects, empty lists, empty strings and nulls are dropped, and so, as in Donut (its ``if not
data``), is a field whose value is a lone ``0``, ``0.0`` or ``false``; in a list of scalars only strings and
numbers are kept (Donut's ``type(item) in {str, int, float}``: booleans and nulls are dropped there). One
deliberate difference: a lone whitespace-only string is dropped like an empty one, where Donut keeps it as an
empty leaf (its ``not data`` sees ``"  "`` as a value, then strips it to ``""``), so that "absent", ``""`` and
``"  "`` score alike.

Tree: the root, one node per key, one ``<subtree>`` node per object inside a list, one leaf per string.
Costs (Donut's): inserting or removing a leaf costs its length and any other node 1; relabelling a leaf as a
leaf costs the character edit distance of the two strings, a leaf as an inner node 1 + the leaf's length,
an inner node as another 0 or 1 (same key or not).

``zss`` (the package Donut calls) is small and unmaintained since 2018; the algorithm is 40 lines, so it is
written here and tested against the recursive definition of forest edit distance.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

ROOT = "<root>"
SUBTREE = "<subtree>"


def edit_distance(first: str, second: str) -> int:
    """Levenshtein distance: insertions, deletions and substitutions of one character each cost 1."""
    if len(first) < len(second):
        first, second = second, first
    previous = list(range(len(second) + 1))
    for i, char in enumerate(first, start=1):
        current = [i]
        for j, other in enumerate(second, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char != other)))
        previous = current
    return previous[-1]


@dataclass
class Node:
    label: str
    children: list["Node"] = field(default_factory=list)
    leaf: bool = False  # a value (its label is the text), not a key / <root> / <subtree>


def tree_edit_distance(
    first: Node,
    second: Node,
    *,
    insert_cost: Callable[[Node], float],
    remove_cost: Callable[[Node], float],
    update_cost: Callable[[Node, Node], float],
) -> float:
    """The least total cost of node removals, insertions and relabellings that turn ``first`` into
    ``second`` (ordered trees), by Zhang & Shasha's dynamic programme over keyroot pairs."""
    nodes1, leftmost1, keyroots1 = _postorder(first)
    nodes2, leftmost2, keyroots2 = _postorder(second)
    removes = [remove_cost(node) for node in nodes1]
    inserts = [insert_cost(node) for node in nodes2]
    updates: dict[tuple[int, int], float] = {}
    tree = [[0.0] * len(nodes2) for _ in nodes1]  # tree[i][j]: distance of the subtrees rooted at i and j
    for i in keyroots1:
        for j in keyroots2:
            left1, left2 = leftmost1[i], leftmost2[j]
            rows, cols = i - left1 + 2, j - left2 + 2
            # forest[x][y]: distance between the forests nodes1[left1 : left1 + x] and nodes2[left2 : left2 + y]
            forest = [[0.0] * cols for _ in range(rows)]
            for x in range(1, rows):
                forest[x][0] = forest[x - 1][0] + removes[left1 + x - 1]
            for y in range(1, cols):
                forest[0][y] = forest[0][y - 1] + inserts[left2 + y - 1]
            for x in range(1, rows):
                a = left1 + x - 1
                for y in range(1, cols):
                    b = left2 + y - 1
                    drop, add = forest[x - 1][y] + removes[a], forest[x][y - 1] + inserts[b]
                    if leftmost1[a] == left1 and leftmost2[b] == left2:  # both forests are whole trees
                        if (a, b) not in updates:
                            updates[a, b] = update_cost(nodes1[a], nodes2[b])
                        forest[x][y] = min(drop, add, forest[x - 1][y - 1] + updates[a, b])
                        tree[a][b] = forest[x][y]
                    else:
                        before = forest[leftmost1[a] - left1][leftmost2[b] - left2]
                        forest[x][y] = min(drop, add, before + tree[a][b])
    return tree[-1][-1]


def _postorder(root: Node) -> tuple[list[Node], list[int], list[int]]:
    """Nodes in post-order, each one's leftmost leaf (as a post-order index), and the keyroots (for each
    distinct leftmost leaf, the highest node having it)."""
    nodes: list[Node] = []
    leftmost: list[int] = []

    def visit(node: Node) -> int:
        first_leaf = None
        for child in node.children:
            child_leftmost = visit(child)
            if first_leaf is None:
                first_leaf = child_leftmost
        nodes.append(node)
        leftmost.append(len(nodes) - 1 if first_leaf is None else first_leaf)
        return leftmost[-1]

    visit(root)
    highest = {left: index for index, left in enumerate(leftmost)}
    return nodes, leftmost, sorted(highest.values())


# ------------------------------------------------------------------------------------------ Donut's costs
def _insert_or_remove(node: Node) -> float:
    return len(node.label) if node.leaf else 1


def _update(first: Node, second: Node) -> float:
    if first.leaf and second.leaf:
        return edit_distance(first.label, second.label)
    if first.leaf != second.leaf:
        return 1 + len(first.label if first.leaf else second.label)
    return float(first.label != second.label)


def document_distance(first: Node, second: Node) -> float:
    return tree_edit_distance(first, second, insert_cost=_insert_or_remove, remove_cost=_insert_or_remove,
                              update_cost=_update)


# ------------------------------------------------------------------------------------------ JSON documents
def normalise(value: Any) -> Any:
    """Donut's normal form (module docstring): a dict of key -> non-empty list, or a list, or None if empty."""
    if isinstance(value, dict):
        out = {}
        for key in sorted(value, key=lambda k: (len(_key_text(k)), _key_text(k))):
            child = normalise(value[key])
            if child:
                out[_key_text(key)] = child if isinstance(child, list) else [child]
        return out or None
    if isinstance(value, list):
        if value and all(isinstance(item, dict) for item in value):
            return [child for child in map(normalise, value) if child] or None
        # Donut keeps only items whose type is exactly str, int or float: not bools, nulls, nested lists or dicts
        return [text for text in (_scalar_text(item) for item in value if type(item) in (str, int, float)) if text] \
            or None
    if not value:
        return None  # Donut's ``if not data``: a lone 0, 0.0, false, null or "" is no value at all
    text = _scalar_text(value)
    return [text] if text else None


def _key_text(key: Any) -> str:
    return unicodedata.normalize("NFC", str(key))


def _scalar_text(value: Any) -> str:
    """A leaf's text as Donut writes it (``str(value).strip()``: ``True``, ``2.5``, ``0`` inside a list),
    NFC-composed (canonically equivalent spellings of "é" are one value; see ``metrics.nfc``)."""
    return unicodedata.normalize("NFC", str(value)).strip()


def document_tree(document: Any) -> Node:
    """The tree of a normalised document (``normalise`` is applied here)."""
    normal = normalise(document) if document is not None else None
    root = Node(ROOT)
    if isinstance(normal, dict):
        root.children = [_key_node(key, values) for key, values in normal.items()]
    elif isinstance(normal, list):  # a top-level list: Donut's tree for a list value, under the root
        root.children = _list_children(normal)
    return root


def _key_node(key: str, values: list) -> Node:
    return Node(key, _list_children(values))


def _list_children(values: list) -> list[Node]:
    if values and isinstance(values[0], dict):
        return [Node(SUBTREE, [_key_node(k, v) for k, v in item.items()]) for item in values]
    return [Node(text, leaf=True) for text in values]


def ted_accuracy(prediction: Any, reference: Any) -> float:
    """``max(0, 1 - TED(pred, gt) / TED(empty, gt))``; 1.0 when both are empty, 0.0 when only gt is."""
    truth = document_tree(reference)
    worst = document_distance(Node(ROOT), truth)
    distance = document_distance(document_tree(prediction), truth)
    if worst == 0:
        return 1.0 if distance == 0 else 0.0
    return max(0.0, 1.0 - distance / worst)


def flatten(document: Any) -> list[tuple[str, str]]:
    """The ``(dotted key path, value)`` pairs of a normalised document; objects in lists keep their path."""
    pairs: list[tuple[str, str]] = []

    def walk(value: Any, path: str) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                walk(child, f"{path}.{key}" if path else key)
        elif isinstance(value, list):
            for item in value:
                walk(item, path)
        else:
            pairs.append((path, value))

    normal = normalise(document) if document is not None else None
    if normal:
        walk(normal, "")
    return pairs


def field_counts(prediction: Any, reference: Any) -> tuple[int, int, int]:
    """(matched pairs, predicted pairs, reference pairs): each reference pair is matched at most once."""
    predicted, expected = Counter(flatten(prediction)), Counter(flatten(reference))
    matched = sum((predicted & expected).values())
    return matched, sum(predicted.values()), sum(expected.values())


_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")


def parse_json_answer(text: str) -> Any:
    """A model's JSON answer as a value; an answer that is not JSON is an empty document (None).

    Tolerates what instruction-tuned models wrap JSON in: code fences, and prose around one ``{...}``.
    """
    text = _FENCE.sub("", text.strip())
    for candidate in (text, text[text.find("{"): text.rfind("}") + 1] if "{" in text else ""):
        if not candidate:
            continue
        try:
            value = json.loads(candidate)
        except (ValueError, RecursionError):
            continue
        # json.loads accepts ~1000 levels, the recursive normal form / tree / flattening below do not (a
        # degenerate answer '{"a":{"a":...' 400 deep raised RecursionError and ended the whole evaluation after
        # generation). No receipt is nested that deep: such an answer is not a document, like non-JSON.
        return value if _nesting_depth(value) <= MAX_DOCUMENT_DEPTH else None
    return None


MAX_DOCUMENT_DEPTH = 64  # CORD's gt_parse is 3-4 levels deep (menu -> [item] -> field -> value)


def _nesting_depth(value: Any) -> int:
    """How many objects / arrays deep ``value`` is, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest
