"""The ML task shared by server and devices: config, model, LoRA rank algebra, data, loops."""
