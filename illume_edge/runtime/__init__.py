"""illume-edge runtime: numpy + onnxruntime (+ tokenizers, pillow). Never imports torch."""
