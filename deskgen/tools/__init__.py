"""Tooling the server never runs: the tiny random-weight model builders (``python -m deskgen.tools.tiny``,
what ``make models`` runs), the synthetic desk / non-desk scenes they train and test on, and the desk
gate's training CLI (``python -m deskgen.tools.train_classifier``). Runtime modules never import from here.
"""
