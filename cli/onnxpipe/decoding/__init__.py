"""Search strategies and logits processors on numpy logits, shared by generate and translate."""
