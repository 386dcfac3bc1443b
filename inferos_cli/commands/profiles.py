"""`inferos profiles` (being built in this session)."""

from inferos_cli.errors import InferosError


def list_profiles() -> None:
    """Not built yet."""
    raise InferosError("not built yet")


def show() -> None:
    """Not built yet."""
    raise InferosError("not built yet")
