"""Views: renderers (a snapshot in, a rich renderable or plain lines out), the live run view, plots, and the
run session behind ``inferos run``."""
