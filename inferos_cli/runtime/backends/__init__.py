"""Backends that produce engine events: in-process ONNX Runtime, a Lemonade server, the GAIA CLI."""
