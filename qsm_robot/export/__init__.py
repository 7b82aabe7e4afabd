"""Export: distil the diffusion sampler into a few-step student and write a verified ONNX policy.

``contract`` and ``runtime`` import no torch: the serving side reads models through them.
"""
