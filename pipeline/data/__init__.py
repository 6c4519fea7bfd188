"""Datasets by name, validation, stratified splitting and fingerprinting."""
