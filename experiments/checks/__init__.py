"""Checks of the paper-scale configuration that need real sizes but no training run."""
