"""What a user reads from a scores file: the diagnosis, selections, plots and ``info``."""
