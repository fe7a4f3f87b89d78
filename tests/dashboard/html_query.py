"""A tiny DOM for the dashboard tests: parse HTML with the standard library, find by data-testid.

Enough for server-rendered pages: elements, attributes and text (entities decoded), void
elements, and ``find_all(testid=..., tag=..., **attrs)`` anywhere below a node.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser

VOID = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param"}
    | {"source", "track", "wbr"}
)


@dataclass
class Node:
    tag: str
    attrs: dict[str, str] = field(default_factory=dict)
    children: list[Node | str] = field(default_factory=list)

    def text(self) -> str:
        """All the text below this node, whitespace collapsed."""
        return " ".join("".join(self._texts()).split())

    def _texts(self) -> Iterator[str]:
        for child in self.children:
            if isinstance(child, str):
                yield child
            else:
                yield from child._texts()

    def raw_text(self) -> str:
        """The text below this node exactly as parsed (for ``<pre>`` blocks)."""
        return "".join(self._texts())

    def iter(self) -> Iterator[Node]:
        for child in self.children:
            if isinstance(child, Node):
                yield child
                yield from child.iter()

    def find_all(
        self, testid: str | None = None, tag: str | None = None, **attrs: str
    ) -> list[Node]:
        wanted = dict(attrs)
        if testid is not None:
            wanted["data-testid"] = testid
        found = []
        for node in self.iter():
            if tag is not None and node.tag != tag:
                continue
            if all(node.attrs.get(k.replace("_", "-")) == v for k, v in wanted.items()):
                found.append(node)
        return found

    def find(self, testid: str | None = None, tag: str | None = None, **attrs: str) -> Node:
        """The only match; AssertionError when there is none or more than one."""
        found = self.find_all(testid, tag, **attrs)
        assert len(found) == 1, f"expected one {testid or tag} {attrs}, found {len(found)}"
        return found[0]

    def __getitem__(self, name: str) -> str:
        return self.attrs[name]


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document")
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self.stack) - 1, 0, -1):
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(html: str) -> Node:
    builder = _Builder()
    builder.feed(html)
    builder.close()
    return builder.root
