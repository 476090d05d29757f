"""The run's own failures that end it, each in one line (no heavy imports: the jobs catch them)."""


class RunFailed(RuntimeError):
    """A task of the run failed (a write to a store that is gone, refuses or does not answer): the run
    ends, its cause in one line; the answers written are kept for a resume."""


class StartFailed(RunFailed):
    """A stage's actors could not start (their creation task raised): the run ends, its cause in one line."""
