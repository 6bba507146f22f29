"""One module per subcommand. Modules import only typer and pie's light modules at import time."""
