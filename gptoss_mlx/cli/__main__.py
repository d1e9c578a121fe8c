"""`python -m gptoss_mlx.cli ARGS` runs the command line (the tests use it)."""

from . import main

main()
