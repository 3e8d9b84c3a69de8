"""Studies of the questions Tun et al. left open, each one command that writes a report (``medfed study``).

* :mod:`medfed.studies.clients`: quality and privacy against the number of sites, the same data and compute
  split across 2 to 50 sites (IID and Dirichlet), with and without DP.
* :mod:`medfed.studies.personalization`: per-site scores of the global model, the global model fine-tuned at
  each site with DP charged to its own ledger, and a local-only model.
* :mod:`medfed.studies.lightweight`: presets smaller than ``tiny``, fewer DDIM steps, TorchScript export for edge
  sites: parameters, size on disk, peak memory, latency and FID.

They are thin orchestration over the platform's own functions: real Flower runs
(:func:`medfed.launch.simulation.run_simulation`, DP-SGD and SecAgg+ on), the sites' privacy ledgers, and
:mod:`medfed.evaluation` on a named feature network. Modules are imported where used, so ``medfed --help`` stays
fast.
"""
