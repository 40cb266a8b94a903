"""The policy engine: typed model, compilation of a bundle, and the decision."""
