"""Training: shared machinery (``common``: accelerate setup, safetensors checkpoints, resume, meters), the VAE trainer
(``vae``), the DiT trainer (``dit``) and LoRA adapters for it (``lora``)."""
