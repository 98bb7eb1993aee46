"""Tooling the server never runs: the tiny random-weight model builders (``python -m deskgen.tools.tiny``,
what ``make models`` runs), the synthetic desk / non-desk scenes they train and test on, and the desk
gate's training (``deskgen.tools.gate_training``, run by ``python -m deskgen.train_classifier``). Runtime modules never import from here.
"""
