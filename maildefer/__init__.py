"""maildefer."""
