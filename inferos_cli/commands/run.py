"""`inferos run` (being built in this session; owned by one helper)."""

from inferos_cli.errors import InferosError


def run() -> None:
    """Not built yet."""
    raise InferosError("`inferos run` is not built yet")
