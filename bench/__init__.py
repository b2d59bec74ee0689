"""The side-by-side benchmark of bangui-geo: ``python -m bench`` (or ``scripts/bench``).

It runs the real services against a fresh vhost and a temp database and prints, for each target,
the project's figure next to a bare baseline measured in the same run, so the ratios stay
meaningful on whatever machine runs them.
"""
