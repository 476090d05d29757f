"""The run's own failures that end it, each in one line (no heavy imports: the jobs catch them)."""


class StartFailed(RuntimeError):
    """A stage's actors could not start (their creation task raised): the run ends, its cause in one line."""
