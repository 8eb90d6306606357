"""Chapter 5: fine-tuning, the core of `minilora demo`.

A pretrained MLP meets a shifted task (digits rotated by 90 degrees). Full fine-tuning trains
every weight; LoRA trains rank-8 adapters on frozen weights. LoRA should reach nearly the same
accuracy with a small fraction of the parameters.
"""

from minilora.tools import demo

results = demo.run(epochs=20, r=8, alpha=16, out=lambda line: None if "epoch" in line
                   else print(line))
assert results["lora_params_fraction"] <= 0.10
assert results["accuracy_gap_points"] <= 3.0
print("verified: LoRA trains at most 10% of the parameters and ends within 3 points")
