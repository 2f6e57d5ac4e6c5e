"""The ``cmm`` command: ``main`` parses and dispatches, one module per larger command."""
