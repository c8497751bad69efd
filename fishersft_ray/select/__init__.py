"""Selection: one request (request.py) for the greedy driver (greedy.py) over objectives
(logdet.py: TokenOD; vopt.py: V-optimal), the baseline samplers (samplers.py) and the method
registry (methods.py)."""

from .greedy import Selection
from .logdet import information_matrix, logdet_gains, select
from .methods import CERTIFIED, METHODS, run_method
from .request import Hooks, SelectionRequest
from .samplers import (density_sampling, fill_budget, kernel_density, longest_first,
                       mean_embeddings, uniform_random)
from .vopt import select_vopt

__all__ = ["CERTIFIED", "METHODS", "Hooks", "Selection", "SelectionRequest", "density_sampling",
           "fill_budget", "information_matrix", "kernel_density", "logdet_gains", "longest_first",
           "mean_embeddings", "run_method", "select", "select_vopt", "uniform_random"]
