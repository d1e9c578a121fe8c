"""The error types gptoss-mlx raises for bad input. The CLI prints them as one line, no traceback."""


class GptOssError(Exception):
    """Base of every error a user can cause (bad files, bad requests, full disks)."""

    exit_code = 1


class ConfigError(GptOssError):
    """A config.json that is missing, malformed or out of bounds."""


class CheckpointError(GptOssError):
    """A checkpoint or converted folder that is missing files, truncated or inconsistent."""


class UsageError(GptOssError):
    """Bad command-line usage or request (exit code 2)."""

    exit_code = 2


class OutputError(GptOssError):
    """Output that cannot be written: a full disk, /dev/full, a closed pipe or descriptor.
    `stdout`: the failed stream is stdout (the CLI then silences it so exiting cannot fail)."""

    def __init__(self, message: str, *, stdout: bool = False, exit_code: int = 1):
        super().__init__(message)
        self.stdout = stdout
        self.exit_code = exit_code
