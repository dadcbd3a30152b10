"""The `pfp-onnx` command line (installed as package pfp_onnx_cli to avoid a top-level `cli` clash)."""
