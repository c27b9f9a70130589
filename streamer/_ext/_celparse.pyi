# Hand-written type stub of the compiled CEL parser (streamer/_ext/_celparse.pyx);
# mypy checks the Python side against it.
from streamer.matching.cel import Expr

def parse(
    source: str,
    *,
    max_length: int = ...,
    max_depth: int = ...,
    max_nodes: int = ...,
    check: bool = False,
) -> Expr: ...
