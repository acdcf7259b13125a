
šgpu-01Š
gpu-01.exampleDebian GNU/Linux 136.12.0"AMD EPYC 9654(`0€€€€€ :H(GPU-00000000-0000-0000-0000-000000000000NVIDIA H100 80GB HBM3 €€€€À:J(GPU-00000001-0000-0000-0000-000000000000NVIDIA H100 80GB HBM3 €€€€ÀJ	570.86.15R12.8Z
address10.0.0.1Z
poola100b0.1.0jnvmlrb
Y

llama-8b-10123456789abvllm/vllm-openai:v0.8.5"running*healthy2llama-8b:1@ ËíÂ±4€ ñÂ±4z
1.22.1 è