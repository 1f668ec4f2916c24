"""Self-distillation and partial-label learning (SD-PLL): block-model theory, label corruption."""
