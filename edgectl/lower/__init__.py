"""Export stage: torch.export and ExecuTorch lowering of the model to a self-contained .pte."""
