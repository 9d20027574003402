"""Training many adapters in one step: `AdapterTrainer` (fixed device slots, each
an adapter and its optimizer state, updated per slot)."""
