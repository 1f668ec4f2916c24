"""The SD-PLL paper layer: ``study`` runs the self-distillation sweeps and turns them into tables."""
