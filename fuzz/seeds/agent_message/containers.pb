*b
Y

llama-8b-10123456789abvllm/vllm-openai:v0.8.5"running*healthy2llama-8b:1@ ËíÂ±4€ ñÂ±4