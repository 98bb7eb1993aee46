"""A/B experiments of LoRA mixes: the statistics of a report (:mod:`deskgen.experiments.stats`).

Exposures, feedback, storage and the report routes build on these (issue 9); the statistics come
first because every number a report shows is computed here, and tested against independent values.
"""
