# Hand-written type stub of the compiled core (streamer/_ext/_core.pyx);
# mypy checks the Python side against it.
from typing import Any, Final, final

from typing_extensions import disjoint_base

ERROR: Final[object]
MISSING: Final[object]
NOKEY: Final[object]
TRUE_KEY: Final[object]
FALSE_KEY: Final[object]
OPS: Final[dict[str, int]]
ARITH: Final[dict[str, int]]
STRING_FUNCTIONS: Final[dict[str, int]]
ACCESS_KINDS: Final[dict[str, int]]

def index_key(v: object) -> object: ...
def range_key(v: object) -> float | None: ...

@disjoint_base
class Node:
    def __call__(
        self, bindings: dict[str, object] | None = None, doc: object = None, doc_id: object = None
    ) -> object: ...

@final
class Const(Node):
    def __init__(self, value: object) -> None: ...

@final
class Ident(Node):
    def __init__(self, name: str) -> None: ...

@final
class Root(Node): ...

@final
class DocPath(Node):
    def __init__(self, pid: int) -> None: ...

@final
class Field(Node):
    def __init__(self, operand: Node, field: str, test_only: bool) -> None: ...

@final
class Index(Node):
    def __init__(self, operand: Node, index: Node) -> None: ...

@final
class Junction(Node):
    def __init__(self, terms: list[Node], conjunction: bool) -> None: ...

@final
class Not(Node):
    def __init__(self, operand: Node) -> None: ...

@final
class Neg(Node):
    def __init__(self, operand: Node) -> None: ...

@final
class Cond(Node):
    def __init__(self, cond: Node, then: Node, other: Node) -> None: ...

@final
class Binary(Node):
    def __init__(self, op: str, left: Node, right: Node) -> None: ...

@final
class Size(Node):
    def __init__(self, operand: Node) -> None: ...

@final
class StringFunction(Node):
    def __init__(self, name: str, target: Node, arg: Node) -> None: ...

@final
class ListLit(Node):
    def __init__(self, items: list[Node]) -> None: ...

@final
class MapLit(Node):
    def __init__(self, keys: list[Node], values: list[Node]) -> None: ...

@disjoint_base
class Pred: ...

@final
class PathCompare(Pred):
    def __init__(self, pid: int, op: str, const: object) -> None: ...

@final
class PathIn(Pred):
    def __init__(self, pid: int, consts: list[object]) -> None: ...

@final
class PathHolds(Pred):
    def __init__(self, pid: int, const: object, substring: bool) -> None: ...

@final
class Expression(Pred):
    def __init__(self, node: Node) -> None: ...

# Internals of the index and its evaluation: as cdef classes they are
# module attributes all the same, but nothing outside the core uses them.
@disjoint_base
class Ctx: ...

@final
class RangeIndex: ...

@final
class PathIndex:
    def __init__(self, pid: int, coll: CollIndex) -> None: ...

@final
class CollIndex:
    def __init__(self, database: object, collection: object, number: int, always: int) -> None: ...

@final
class Core:
    @property
    def scan_clauses(self) -> int: ...
    def __init__(self) -> None: ...
    def __len__(self) -> int: ...
    def __contains__(self, sub_id: object, /) -> bool: ...
    def stats(self) -> dict[str, int]: ...
    # For tests and diagnostics: per table, (entries in use, entries allocated);
    # "array_bytes": the posting and range arrays' (bytes in use, bytes allocated).
    def tables(self) -> dict[str, tuple[int, int]]: ...
    # Only for the atom factories add runs (streamer.matching.compiler); RuntimeError elsewhere.
    def path_id(self, comps: tuple[str, ...]) -> int: ...
    def add(
        self, sub_id: str, database: str, collection: str, clauses: list[list[Any]], owner: int = 0
    ) -> None: ...
    def remove(self, sub_id: str) -> bool: ...
    def watches(self, database: object, collection: object) -> bool: ...
    def match(
        self, database: object, collection: object, document_id: object, document: object
    ) -> list[str]: ...
    def match_owned(
        self, database: object, collection: object, document_id: object, document: object
    ) -> tuple[list[str], bytes]: ...
    def match_id_owned(
        self, database: object, collection: object, document_id: object
    ) -> tuple[list[str], bytes]: ...
