"""``pyshmfeed bench``: the published comparison, run live on this machine, side by side.

``workload`` is the article's producer and training loop; ``pipelines`` the
peers, one module per family; ``runner`` runs them on one workload;
``report`` prints the table and writes the JSON and the plot; ``command`` is
the command line.
"""

from .pipelines import PIPELINES, Pipeline, select
from .runner import run_bench
from .workload import Workload

__all__ = ["PIPELINES", "Pipeline", "Workload", "run_bench", "select"]
