"""Training: LoRA rank algebra (`lora`), the one local loop (`loop`), differential privacy,
a device's round (`device`), rank from capability, the allocator's memory, what a round costs
a device, and the server's evaluation and saved adapters (`evaluation`)."""
