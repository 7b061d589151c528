"""The trainer that runs inside training pods under torchrun."""
