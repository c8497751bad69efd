"""`fishersft-ray evaluate`: fine-tune on subsets picked by TokenOD and baselines and compare
held-out NLL. data (split, scenarios) → methods (registry) → head / model_tuning (trainers)
→ protocol (recipe, runs, checkpoint) → outputs; run.py composes them with select's stages."""
