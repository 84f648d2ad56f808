"""The daemon around one ``Supervisor``: its ZeroMQ and HTTP doors, the CLI, logging and what an operator sees."""
