"""The policy being trained: building it from a model directory (build.py), its optimizer and
learning-rate schedule (optim.py), LoRA through peft (lora.py). What goes to disk is files/."""
