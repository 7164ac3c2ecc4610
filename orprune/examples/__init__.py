"""Examples: small datasets, reference architectures, torch-pruning baselines and ``orprune demo``.

What the demo, notebooks, benchmarks and tests train and compare against; not needed to prune a model.
May import every stage below the command line (core, layer, network, budget, training, pipeline).
"""
