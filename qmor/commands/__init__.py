"""The `qmor` command's subcommands, one module each with `main(argv, prog) -> exit code`; qmor/cli.py dispatches
to them and scripts/*.py are thin wrappers around the same functions."""
