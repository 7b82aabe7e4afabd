"""The real-time serving node (qsm-serve). Imports numpy, pyzmq and onnxruntime only."""
