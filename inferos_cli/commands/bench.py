"""`inferos bench` (being built in this session; owned by one helper)."""

from inferos_cli.errors import InferosError


def bench() -> None:
    """Not built yet."""
    raise InferosError("`inferos bench` is not built yet")
