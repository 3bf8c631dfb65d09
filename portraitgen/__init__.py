"""PortraitGen: exemplar-driven GRPO post-training of flow-matching text-to-image models for portraits."""
__version__ = "0.1.0"
