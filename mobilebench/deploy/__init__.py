"""Deployment commands: `export` (ONNX / torch.export with a parity check), `quantize` (int8),
`prune` (unstructured or whole-channel) and `bench latency` (PyTorch vs onnxruntime fp32 / int8).

Each command takes a checkpoint, writes its files and one JSON report into its own run dir, and
turns every user mistake into a one-line `UserError`. onnxruntime is imported only when needed.
"""
