"""Question files, prompts, data converters and the demo model/data."""
