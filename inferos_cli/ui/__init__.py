"""Pure renderers: a snapshot in, a rich renderable out."""
