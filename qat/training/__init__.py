"""Fine-tuning: ``QATTrainer``, fine-tuning modes, the non-finite guard, and the train loop
behind ``qat train``."""
