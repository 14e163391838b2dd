"""Runnable demonstrations on bundled data: the digits (and PDS) demo, the LM demo, the
reference models and training loop they share, and the paper-claim experiments."""
