"""Quality measurements: the teacher-forced loop (``perplexity``), ``inferos eval``, the auto-tuner, and the
default text inferos ships."""
