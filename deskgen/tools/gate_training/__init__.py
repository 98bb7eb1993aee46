"""The desk gate's training, behind its one entry point ``python -m deskgen.train_classifier`` (the CLI,
:mod:`deskgen.train_classifier`, says what a run does).

  * :mod:`.data`: what a run reads: the class folders' images (decoded without the upload limits), the
    stratified held-out split, and the shuffled, augmented ``tf.data`` pipeline.
  * :mod:`.metrics`: validation ROC-AUC, precision / recall, and the threshold for a target precision.
  * :mod:`.training`: the run itself: arguments and starting weights checked before TensorFlow, the two
    stages with the best epoch kept, the ``.keras`` file and its ``.json`` sidecar (:func:`train_gate`).
"""
