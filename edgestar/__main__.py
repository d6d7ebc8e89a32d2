from edgestar.cli import cli

cli(prog_name="edgestar")
