"""Functional attention ops; each folder holds the public op, its dispatch and its backends."""
