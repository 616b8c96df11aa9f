"""Engines checked against the PyTorch eager model: compare (engine vs eager, the first diverging layer) and eager as an engine."""
