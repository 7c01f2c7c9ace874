"""Integrations with other training libraries (above the middle layers, below the commands):
``qat.integrations.trl`` gives TRL's ``SFTTrainer`` qat's quantisation-aware training;
``qat.integrations.lm_eval`` scores a quantised model with lm-evaluation-harness."""
