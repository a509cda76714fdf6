"""K-FAC factor sizes of two reference models, for the decomposition benchmarks.

Every layer has two factors: A (input side, n = fan-in, + 1 when the layer has a bias, the
homogeneous coordinate) and G (output side, n = fan-out). Convolutions have fan-in C_in * k * k.

ResNet-50 (torchvision layout, 54 layers -> 108 factors; convolutions have no bias, BatchNorm
parameters are left to the first-order fallback): conv1 7x7 3->64 (A 147, G 64); four stages of
bottlenecks [3, 4, 6, 3] with widths 64/128/256/512 and outputs 4x wider: 1x1 reduce, 3x3
(A = 9 * width), 1x1 expand, plus a 1x1 projection shortcut in each stage's first block; fc
2048->1000 with bias (A 2049, G 1000).

GPT-2 small, 12 blocks (48 layers -> 96 factors; all Conv1D layers have biases): attention c_attn
768->2304 (A 769, G 2304), attention c_proj 768->768 (A 769, G 768), MLP c_fc 768->3072
(A 769, G 3072), MLP c_proj 3072->768 (A 3073, G 768). Embeddings and the tied LM head
(G would be 50257) are left out, as K-FAC implementations do.
"""
from __future__ import annotations

from collections import Counter
from typing import Dict, List, Tuple

Layer = Tuple[str, int, int]  # (name, A size, G size)


def resnet50_layers() -> List[Layer]:
    layers: List[Layer] = [("conv1", 3 * 7 * 7, 64)]
    c_in = 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        c_out = 4 * width
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            layers.append((f"{p}.conv1", c_in, width))          # 1x1 reduce
            layers.append((f"{p}.conv2", width * 9, width))     # 3x3
            layers.append((f"{p}.conv3", width, c_out))         # 1x1 expand
            if b == 0:
                layers.append((f"{p}.downsample.0", c_in, c_out))  # 1x1 projection
            c_in = c_out
    layers.append(("fc", 2048 + 1, 1000))
    return layers


def gpt2_small_layers(n_layer: int = 12, d: int = 768) -> List[Layer]:
    layers: List[Layer] = []
    for i in range(n_layer):
        layers += [(f"h.{i}.attn.c_attn", d + 1, 3 * d), (f"h.{i}.attn.c_proj", d + 1, d),
                   (f"h.{i}.mlp.c_fc", d + 1, 4 * d), (f"h.{i}.mlp.c_proj", 4 * d + 1, d)]
    return layers


MODELS = {"resnet50": resnet50_layers, "gpt2-small": gpt2_small_layers}


def factor_sizes(model: str) -> List[int]:
    """All factor sizes of ``model``, one entry per factor."""
    return [n for _, a, g in MODELS[model]() for n in (a, g)]


def buckets(sizes: List[int]) -> Dict[int, int]:
    """{n: number of factors of that size}, ascending n."""
    return dict(sorted(Counter(sizes).items()))


if __name__ == "__main__":
    for name in MODELS:
        s = factor_sizes(name)
        print(f"{name}: {len(s)} factors, {sum(n * n for n in s) * 4 / 2**20:.0f} MiB fp32; "
              f"buckets {buckets(s)}")
