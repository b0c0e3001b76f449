"""Typer command signatures, one module per subcommand.

These modules import only typer and the standard library at top level; the work happens
in the stage modules (`dcpo_cli.stages.rollout`, ...), imported inside each command body.
"""
