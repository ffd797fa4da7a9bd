"""`python -m minislm.experiments`: every expert, fusion, cascade, baseline and ablation on the same test rows.

    seed_run.py    one seed of one protocol: train the team, score every row (validation and test)
    aggregate.py   seeds -> mean ± sd per row, the validation-chosen best single and best team, ablation statistics
    stats.py       macro-F1, exact McNemar, paired bootstrap, Holm
    __main__.py    the command: protocols, seeds, resuming, the files in notebooks/results/
"""
