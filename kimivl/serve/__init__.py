"""An OpenAI-compatible chat completions server (``kimivl serve``) over a continuously batched engine."""
