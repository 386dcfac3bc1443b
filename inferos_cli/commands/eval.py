"""`inferos eval` (being built in this session; owned by one helper)."""

from inferos_cli.errors import InferosError


def evaluate() -> None:
    """Not built yet."""
    raise InferosError("`inferos eval` is not built yet")
