"""harden: make neural networks survive the faulty weight memory of the chips they run on."""

__version__ = "0.1.0"
