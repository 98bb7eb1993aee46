"""``python -m deskgen.train_classifier DATA_DIR --out gate.keras``: the desk gate's training CLI.

The program lives in :mod:`deskgen.tools.train_classifier` (with the other tools the server never runs);
this module is its short name, and ``python -m deskgen.tools.train_classifier`` keeps working.
"""

from __future__ import annotations

from deskgen.tools.train_classifier import main

if __name__ == "__main__":
    main()
