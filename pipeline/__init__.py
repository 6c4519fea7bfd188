"""RobustGate: turn a model and its data into robustness evidence an auditor can sign."""

__version__ = "0.1.0"
