"""``gradscore experiment``: the seed papers' headline claims, checked on embedded data
(or a user's data and model): pruning curves (Data Diet), data-map regions in and out of
distribution (Dataset Cartography), and JTT on a spurious feature. One module each;
results as JSON + Markdown + PNG."""
from .common import MODES, Mode, Setup, digits_setup, file_setup, fit

__all__ = ["MODES", "Mode", "Setup", "digits_setup", "file_setup", "fit"]
