"""``python -m coninfer``: the same command line as ``coninfer``."""

from coninfer.cli import main

if __name__ == "__main__":
    main(prog_name="coninfer")
