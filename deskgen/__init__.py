"""deskgen: the Ray-free model layer (classifier, captioner, generator) and its helpers.

Importing this package imports nothing heavy: TensorFlow, torch, transformers and diffusers are
imported inside the constructors that need them.
"""
