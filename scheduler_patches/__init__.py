"""Engine-core side of UniPrefill, installed as `uniprefill.scheduler_patches`."""
