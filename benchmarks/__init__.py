"""Speed benchmarks of ibllm-lab (issue 7): ``ibllm-lab bench`` or ``python -m benchmarks``."""
