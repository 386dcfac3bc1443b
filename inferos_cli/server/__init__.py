"""`inferos serve`: the control API and the Lemonade/OpenAI-compatible routes."""
