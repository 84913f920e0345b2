"""Shrink, Grow and the mix of two anchors: any size between them, teacher-free."""
