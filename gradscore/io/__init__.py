"""Files in and out: checkpoints (and their import), datasets, the scores store and its
journal, atomic writes, the dynamics import/export, and where a command may write."""
