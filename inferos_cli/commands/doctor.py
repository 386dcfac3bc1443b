"""`inferos doctor` (being built in this session; owned by one helper)."""

from inferos_cli.errors import InferosError


def doctor() -> None:
    """Not built yet."""
    raise InferosError("`inferos doctor` is not built yet")
