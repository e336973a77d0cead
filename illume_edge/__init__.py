"""illume-edge: export and run ILLUME-family unified multimodal models on the edge."""
__version__ = "0.1.0"
