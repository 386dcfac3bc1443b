"""`inferos serve` (being built in this session; owned by one helper)."""

from inferos_cli.errors import InferosError


def serve() -> None:
    """Not built yet."""
    raise InferosError("`inferos serve` is not built yet")
