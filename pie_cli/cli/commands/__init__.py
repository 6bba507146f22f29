"""One module per subcommand: options -> a frozen spec -> one service call -> render and exit code.

Modules import only typer and pie's light modules at import time; a command never imports another.
"""
