"""What the tiny-model tests of pruning and recovery share: the architectures they cover, one
fixed prompt, and its logits (pytest's prepend import mode puts tests/ on sys.path)."""

import torch

ARCHS = ["llama", "qwen3", "glm4"]
IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 31, 64, 12]])


def logits(model, ids=IDS):
    with torch.inference_mode():
        return model(input_ids=ids).logits
