"""vlmprune: adaptive visual-token pruning and merging for vision-language models."""
