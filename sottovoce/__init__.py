"""The ``sottovoce`` command line: one entry point, subcommands grouped by part."""
