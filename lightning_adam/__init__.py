"""adamkit for PyTorch Lightning."""
