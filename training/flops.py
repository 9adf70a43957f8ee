"""Model FLOPs per token and the accelerators' peak rates: model FLOPs utilization (MFU)."""

from __future__ import annotations

#: Dense (no sparsity) bf16 tensor-core TFLOP/s per device, from the vendors' datasheets, by a part of the
#: name torch.cuda.get_device_name() reports; the longest part found in a name wins ("H100 PCIe" over "H100").
PEAK_BF16_TFLOPS: dict[str, float] = {
    "B200": 2250.0,
    "GB200": 2500.0,
    "H200 NVL": 835.0,
    "H200": 989.4,
    "GH200": 989.4,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.4,  # SXM ("NVIDIA H100 80GB HBM3")
    "H800": 989.4,
    "H20": 148.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10": 125.0,
    "MI300X": 1307.4,
    "MI250X": 383.0,
}


def device_peak_tflops(name: str) -> float | None:
    """The dense bf16 peak of the device called ``name``, or None for a device not in the table."""
    found = [part for part in PEAK_BF16_TFLOPS if part.lower() in name.lower()]
    return PEAK_BF16_TFLOPS[max(found, key=len)] if found else None


def flops_per_token(n_params: int, n_layer: int, n_embd: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weights plus 12*L*d*T for attention (PaLM appendix B; L*H*Q = L*d),
    with N from training.model.count_parameters (the parameters in matmuls)."""
    return 6 * n_params + 12 * n_layer * n_embd * seq_len
