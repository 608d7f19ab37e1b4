"""Training: fine-tune a checkpoint on a labelled file (transformers' Trainer). Needs the [export] extra.

Like export/, this package is the only other place torch and transformers are imported, and only
inside its functions. It never prints: progress goes to the `report` callback the command passes.
"""
