"""``chimera bench``: the Spec-Bench protocol, every method on the same prompts in the same process."""
