"""fishersft-ray: pick the most informative SFT examples for a given LLM (FisherSFT / TokenOD)."""

__version__ = "0.1.0"

from fishersft_ray.api import SubsetResult, select_subset  # noqa: E402

__all__ = ["SubsetResult", "select_subset"]
