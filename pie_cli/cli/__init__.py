"""The shell: the only code that knows flags, terminals and exit codes.

``app.py`` is the Typer root (``pie``), ``commands/`` holds one module per subcommand
(options -> spec -> one service call -> render), ``boundary.py`` turns exceptions into one
sentence and an exit code, ``options.py`` declares the options every command shares,
``console.py`` owns stdout/stderr and ``display.py`` the progress bars. Nothing outside this
package imports it. Importing it imports nothing heavy: ``pie --help`` stays instant.
"""
