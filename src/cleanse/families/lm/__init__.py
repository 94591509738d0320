"""The language-model family (``family: lm``): instruction samples, a cached pretrained tiny GPT-2
with LoRA adapters, and opinion steering (issue 21); see :mod:`.family`."""
