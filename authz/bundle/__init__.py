"""Policy bundles: reading files with positions, validating them, loading a bundle."""
