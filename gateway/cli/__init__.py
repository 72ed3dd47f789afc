"""`llm-gateway`: the command line (`main`), with `keys`, `report` and `batch` subcommands.

May import: anything in the gateway; nothing imports it.
"""
