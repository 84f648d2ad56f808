"""The engine: one loop thread that owns the devices, their workers and the queue; API threads only post commands to it and read its published status."""
