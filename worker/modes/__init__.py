"""Built-in modes. Each module has a ``load(**args)`` returning task handlers."""
