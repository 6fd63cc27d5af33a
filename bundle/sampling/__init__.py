"""From expression to tissue: the diffusers-style sampler, per-spot generation, counterfactual edits and whole
synthetic slides."""
