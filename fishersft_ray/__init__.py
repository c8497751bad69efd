"""fishersft-ray: pick the most informative SFT examples for a given LLM (FisherSFT / TokenOD)."""

__version__ = "0.1.0"
