"""``python -m dz_lightning`` is the same as the ``dz`` command."""

from dz_lightning.cli import cli_main

if __name__ == "__main__":
    cli_main()
