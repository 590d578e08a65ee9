"""mtnlg: GPT training the Megatron-Turing NLG way, in plain PyTorch."""
