"""The child process that owns the GPU.

``python -m worker --endpoint ... --gen N --parent-pid P`` connects back to its
supervisor, says HELLO, loads the mode the supervisor names, says READY and
runs jobs one at a time until DRAIN. Importing this package is cheap: torch is
imported only by the loaders of modes that need it.
"""
