"""sarmerge: sensitivity-aware merging of RLVR checkpoints."""

__version__ = "0.1.0"
