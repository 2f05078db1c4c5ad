"""Model families (seq-cls, causal-lm, lm-cls): how each loads, its LoRA targets, loss and
metric; the base model wrapped with PEFT LoRA at any rank; where weights come from (hub,
folder, GGUF file, known names) and how they are read one tensor at a time."""
