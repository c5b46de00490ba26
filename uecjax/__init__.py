"""uecjax: RL fine-tuning of language and vision-language models with entropy control, in JAX."""

__version__ = "0.1.0"
