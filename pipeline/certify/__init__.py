"""Formal certificates: bound propagation through auto_LiRPA."""
