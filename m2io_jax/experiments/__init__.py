"""Experiments that combine the entry points into one reported comparison (`python -m m2io_jax.experiments.<name>`).

  systems  every system of `m2io_jax.systems` on one split with the same retrieval: the all-systems table, inline
           against anchors, FTII accuracy against the rule baseline.
"""
