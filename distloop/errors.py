"""Errors a user can hit."""


class MisconfigurationError(ValueError):
    """Bad arguments or config: the message says what to change."""


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later", which is what a requeue does


class Preempted(SystemExit):
    """The run was asked to stop (SIGTERM / SIGUSR1), saved a checkpoint and is exiting.

    Uncaught, it ends the process with exit code 75 and no traceback; a restart with
    ``ckpt_path="last"`` continues exactly where it stopped.
    """

    def __init__(self, checkpoint_path: str) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)
        self.checkpoint_path = checkpoint_path
