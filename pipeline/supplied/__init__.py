"""Models the pipeline did not train: ONNX files and their torch form."""
