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
