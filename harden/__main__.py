"""`python -m harden ...`: the same as the `harden` console script."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="harden")
