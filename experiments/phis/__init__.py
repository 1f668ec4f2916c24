"""The PHI-S paper layer: sweep results → the paper's tables, figures and claim-by-claim verdicts.

``tables`` is the command line and the sweeps' end-of-sweep hooks; ``runs`` loads finished jobs,
``table_writers``/``figures``/``index`` write the outputs, ``claims`` judges the paper's claims,
``analyses`` holds the paper's analyses on plain tensors, ``dry_run`` composes every job of a profile,
``normalization_report`` checks the normalizations in 2-D and ``standins`` writes the toy data of
``paper_tiny``.
"""
