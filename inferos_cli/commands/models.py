"""`inferos models` (being built in this session; owned by one helper)."""

from inferos_cli.errors import InferosError


def list_models() -> None:
    """Not built yet."""
    raise InferosError("`inferos models` is not built yet")
