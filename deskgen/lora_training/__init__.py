"""Training the service's own style LoRA (SDXL, diffusers + peft) as a Ray Train job.

    config.py   the typed, bounded settings of one run (LoraTrainingConfig)
    data.py     training examples: a kohya-style folder, liked generations; checks and pixels
    trainer.py  the model and one training step (LoraTrainer), the output's tensors
    output.py   the LoRA file: metadata, the check, the atomic write into lora_dir
    job.py      the Ray Train job (TorchTrainer, Ray Data), checkpoints and resume

The command line is :mod:`deskgen.train_lora`.
"""
