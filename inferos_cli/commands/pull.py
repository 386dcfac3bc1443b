"""`inferos pull` (being built in this session; owned by one helper)."""

from inferos_cli.errors import InferosError


def pull() -> None:
    """Not built yet."""
    raise InferosError("`inferos pull` is not built yet")
