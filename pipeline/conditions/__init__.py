"""Triggering conditions (ISO 21448): parametric input variations as threats, their empirical worst
case, and what can be certified about them."""
